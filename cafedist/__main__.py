"""``python -m cafedist`` is the same as the ``cafedist`` console script."""

from cafedist.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
