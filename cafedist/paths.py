"""Paths given by the user, checked before anything is written to them (one-line errors)."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Callable

from cafedist.errors import ConfigError


def refuse_empty_path(flag: str, value: str | os.PathLike | None, expected: str) -> None:
    """Refuse an empty path given for ``flag`` (an unset shell variable, ``--out "$OUT"``):
    ``Path("")`` is the working directory. None, the flag left out, passes."""
    if value is not None and not str(value).strip():
        raise ConfigError(f"{flag}: empty path; expected {expected}")


def check_dir_creatable(path: Path, field: str) -> None:
    """Raise a one-line ConfigError unless ``path`` is a directory or can be created as one.

    ``field`` names the option or config field in the message (``--out``, ``data.cache_dir``).
    A missing ``path`` is checked by making (and removing) a folder in its nearest existing parent.
    """
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{field}: {path} exists and is not a directory")
    probe = path
    while not probe.exists():
        if probe.is_symlink():  # a link to a folder not there (yet): no mkdir makes it, and none follows it
            raise ConfigError(f"{field}: cannot create {path}: {probe} is a link to {os.readlink(probe)}, "
                              f"which does not exist (create it first)")
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe != path and probe.exists() and not probe.is_dir():
        raise ConfigError(f"{field}: cannot create {path}: {probe} is a file, not a directory")
    if probe.is_dir() and not os.access(probe, os.W_OK | os.X_OK):
        what = "write into" if probe == path else f"create {path} in"
        raise ConfigError(f"{field}: cannot {what} {probe} (permission denied)")
    if probe != path and probe.is_dir():
        # access() answers for permissions alone, and root passes it everywhere: /proc, /sys, a
        # full quota or a file system that refuses folders would fail only later (a queued job)
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".cafedist-probe-", dir=probe))
        except OSError as exc:
            raise ConfigError(f"{field}: cannot create {path} in {probe} ({exc.strerror})") from None


def user_path(text: str) -> str:
    """argparse type of a path option: a leading ``~`` is the home folder, as the shell would
    have it had it expanded the word (it does not in ``--out=~/runs/a`` or a quoted path,
    which made a folder named ``~`` in the working directory: one ``rm -r ~`` away from the
    home folder)."""
    return os.path.expanduser(text)


def nonempty_path_arg(expected: str) -> Callable[[str], str]:
    """argparse type of a path that must not be empty (a ``"$VAR"`` with ``VAR`` unset: "" would
    be the working directory, or no file at all): refused as "empty path; expected
    ``expected``", otherwise ``~`` expanded (:func:`user_path`)."""
    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"empty path; expected {expected}")
        return user_path(text)
    return parse


#: ``--config``: "" must not train the built-in defaults
config_file_arg = nonempty_path_arg("a YAML config file (leave --config out for the defaults)")
#: a command's run directories (eval, export, status, scaling-report): ``cafedist eval "$RUN"``
#: with ``RUN`` unset, from inside a run directory, evaluated that run and replaced its eval.json
run_dir_arg = nonempty_path_arg("a run directory written by `cafedist train`")
