"""Ctrl-C ends a command as interrupted (exit 130) even where Python lost the KeyboardInterrupt."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

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


def test_a_ctrl_c_while_the_commands_are_imported_waits_for_the_imports_and_ends_as_interrupted(monkeypatch, capsys):
    """Building the parser imports every command's module (torch: seconds): a Ctrl-C there
    escaped main() as a KeyboardInterrupt traceback and the process ended by SIGINT, or, raised
    inside the import machinery, was lost (the command ran to the end) or aborted the process
    in torch's C++. Now the imports finish and then the command ends as interrupted."""
    imported: list[str] = []
    help_text, _, run = cli.COMMANDS["bench"]
    monkeypatch.setitem(cli.COMMANDS, "bench", (help_text, lambda parser: (_ctrl_c(), imported.append("bench")), run))
    try:
        status = cli.main(["bench", "local"])
    except KeyboardInterrupt:
        pytest.fail("a Ctrl-C while the parser was built escaped main()")
    assert status == 130 and imported == ["bench"]
    assert capsys.readouterr().err.strip() == "cafedist: interrupted"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# `python -m CASE bench local`: cafedist.cli.run() with bench's main replaced by BODY (run with
# -m as `python -m cafedist` is: its exit path differs from a script's)
CASE = textwrap.dedent("""
    import functools, os, signal, sys, time
    from cafedist import cli

    def command(args):
        {body}
        return 0

    help_text, add, _ = cli.COMMANDS["bench"]
    cli.COMMANDS["bench"] = (help_text, add, command)
    cli.run()
""")


def _run_case(tmp_path, *body: str) -> subprocess.CompletedProcess:
    from conftest import ROOT, env_for_tests

    (tmp_path / "case.py").write_text(CASE.format(body="\n    ".join(body)))
    return subprocess.run([sys.executable, "-m", "case", "bench", "local"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=env_for_tests(PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}"))


def test_a_ctrl_c_in_code_run_from_source_text_still_exits_130(tmp_path):
    """A Ctrl-C landing in code run by exec/eval of a string (dataclasses make their methods so:
    any import of a module with dataclasses, e.g. torch's during torch.export) was caught,
    printed "interrupted" and exited 130, and CPython then ended `python -m cafedist` by SIGINT."""
    proc = _run_case(tmp_path, "exec('os.kill(os.getpid(), signal.SIGINT); time.sleep(9)', globals())")
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert proc.stderr.strip() == "cafedist: interrupted"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_during_the_interpreters_teardown_keeps_the_exit_status(tmp_path, sig):
    """The teardown after the command (a second or more with torch loaded) runs with every
    signal at its default action: a Ctrl-C there ended a finished command by SIGINT. Here an
    object freed with its module, after Python gave the signals back, sends the signal."""
    proc = _run_case(tmp_path, "class Late:",
                     f"    kill = functools.partial(os.kill, os.getpid(), signal.{sig.name})",
                     "    __del__ = lambda self: self.kill()",
                     "sys.modules['__main__'].late = Late()",
                     "print('done', flush=True)")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "done\n", "")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_while_eval_writes_leaves_its_outputs_as_they_were(tiny_config, tmp_path, sig):
    """SIGTERM (kill, timeout, Slurm) or SIGUSR1 (Slurm's --signal) ended eval on the spot once
    eval.json's temporary file was written: the hidden temporary stayed in the run directory.
    Now they unwind like Ctrl-C: the earlier outputs stay as they were, nothing else is left,
    exit 128 + the signal."""
    import subprocess
    import sys

    from conftest import ROOT, cafedist_in_process, env_for_tests

    run = tmp_path / "run"
    cafedist_in_process("train", "--config", str(tiny_config(rounds=1)), "--out", str(run), "--no-progress",
                        check=True)
    cafedist_in_process("eval", str(run), check=True)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and not p.name.endswith(".lock")}
    script = (  # the signal arrives while the figure is drawn: eval.json is written, not yet renamed
        "import os, signal, sys\n"
        "import cafedist.eval.run as er\n"
        "draw = er.plot_accuracy_vs_macs\n"
        f"er.plot_accuracy_vs_macs = lambda *a, **k: (os.kill(os.getpid(), signal.{sig.name}), draw(*a, **k))\n"
        "from cafedist.cli import main\n"
        f"sys.exit(main(['eval', {str(run)!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env_for_tests(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 128 + sig, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "cafedist: interrupted"
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and not p.name.endswith(".lock")}
    assert after == before  # no temporary file left, no output replaced
