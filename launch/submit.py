#!/usr/bin/env python3
"""``python launch/submit.py ARGS...`` == ``cafedist submit ARGS...`` (submitit launcher).

Works from a source checkout without installing cafedist: the checkout is put on ``sys.path``.
See ``cafedist submit --help`` and ``slurm/README.md``.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    try:
        import cafedist  # noqa: F401 - installed package
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from cafedist.cli import main

    raise SystemExit(main(["submit", *sys.argv[1:]]))
