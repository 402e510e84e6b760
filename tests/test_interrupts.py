"""Ctrl-C ends a command as interrupted (exit 130) even where Python lost the KeyboardInterrupt."""

from __future__ import annotations

import os
import signal
import time

from cafedist import cli


def _with_command(monkeypatch, run) -> None:
    help_text, add, _ = cli.COMMANDS["bench"]
    monkeypatch.setitem(cli.COMMANDS, "bench", (help_text, add, run))


def _ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)  # the handler runs here


def test_a_lost_ctrl_c_still_ends_the_command_as_interrupted(monkeypatch, capsys):
    def swallowing(args) -> int:
        try:  # what a weakref callback's caller does with the KeyboardInterrupt raised inside it
            _ctrl_c()
        except KeyboardInterrupt:
            pass
        return 0

    _with_command(monkeypatch, swallowing)
    assert cli.main(["bench", "local"]) == 130
    assert capsys.readouterr().err.strip() == "cafedist: interrupted"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_command_without_ctrl_c_keeps_its_status(monkeypatch):
    _with_command(monkeypatch, lambda args: 0)
    assert cli.main(["bench", "local"]) == 0
    _with_command(monkeypatch, lambda args: _ctrl_c())
    assert cli.main(["bench", "local"]) == 130
    _with_command(monkeypatch, lambda args: 0)
    assert cli.main(["bench", "local"]) == 0  # an earlier interrupt is not remembered
