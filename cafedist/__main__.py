"""``python -m cafedist`` is the same as the ``cafedist`` console script."""

from cafedist.cli import run

if __name__ == "__main__":
    run()
