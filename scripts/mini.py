"""The CLEAR recipe on the mini teacher, on a CPU: the same as ``python -m clear.mini`` (see clear/mini/recipe.py).

    python scripts/mini.py                  # the full run, <= 15 minutes on 2 CPU cores
    python scripts/mini.py --quick          # a reduced run
    python scripts/mini.py train-teacher    # train the mini teacher (clear/mini/teacher.py)
"""

from clear.mini.__main__ import main

if __name__ == "__main__":
    main()
