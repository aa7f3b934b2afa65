"""What the command lines in ``scripts/`` run, as functions the library's own recipes call too.

Each script builds and parses its parser (nothing here imports argparse); the options two scripts
share are added by a function here (:func:`clear.commands.generate.add_arguments`,
:func:`clear.commands.cache.add_arguments`). Each module's ``run(**options)`` takes the parsed
options by their command-line names, so that a call can be written down as the command that
does the same (:func:`command_line`). :mod:`clear.commands.generate` imports nothing heavy at
module level, so that ``scripts/generate.py --help`` answers at once.
"""

from __future__ import annotations

import shlex


def command_line(script: str, options: dict, repeated: tuple[str, ...] = ()) -> str:
    """``python scripts/<script>.py --name value ...`` for ``run(**options)``: ``None`` and ``False``
    are left out, ``True`` is the bare flag, a list is the flag repeated."""
    argv = []
    for name, value in options.items():
        if value is None or value is False:
            continue
        if value is True:
            argv.append(f"--{name}")
        elif isinstance(value, (list, tuple)):
            for v in value:
                argv += [f"--{name}", str(v)]
        else:
            argv += [f"--{name}", str(value)]
    return shlex.join(["python", f"scripts/{script}.py", *argv])
