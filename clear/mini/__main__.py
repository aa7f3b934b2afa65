"""``python -m clear.mini [run] [options]``: the CLEAR recipe on the mini teacher (:mod:`clear.mini.recipe`);
``python -m clear.mini train-teacher [options]``: train that teacher (:mod:`clear.mini.teacher`)."""

from __future__ import annotations

import sys


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train-teacher"]:
        from .teacher import main as train_teacher

        return train_teacher(argv[1:])
    from .recipe import main as recipe

    return recipe(argv[1:] if argv[:1] == ["run"] else argv)


if __name__ == "__main__":
    main()
