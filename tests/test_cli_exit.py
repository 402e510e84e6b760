"""How a command-line process ends after a distributed command (cafedist.cli.run, lifecycle)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT, env_for_tests, free_port

# a one-rank gloo group stands in for a distributed run; `main` is replaced by what the case needs
SCRIPT = textwrap.dedent("""
    import sys, atexit
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
    import cafedist.cli as cli
    atexit.register(lambda: print("ATEXIT-RAN", flush=True))  # skipped by os._exit only

    def main():
        print("OUTPUT-BEFORE-EXIT", end="", flush=False)  # unflushed on purpose: run() must flush it
        {body}

    cli.main = main
    cli.run()
""")


def _run(body: str, group: bool = True) -> subprocess.CompletedProcess:
    script = SCRIPT.format(port=free_port(), body=body)
    if not group:
        script = script.replace('dist.init_process_group("gloo"', '(lambda *a, **k: None)("gloo"')
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env_for_tests(), capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("code", [0, 2, 75])
def test_a_distributed_command_leaves_by_os_exit_with_its_status_and_flushed_output(code):
    proc = _run(f"return {code}")
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "OUTPUT-BEFORE-EXIT" in proc.stdout
    assert "ATEXIT-RAN" not in proc.stdout  # the interpreter teardown (and gloo's destructors) never ran


def test_an_unexpected_error_in_a_distributed_command_is_reported_and_exits_1():
    proc = _run("raise RuntimeError('boom in a rank')")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" in proc.stderr and "boom in a rank" in proc.stderr
    assert "ATEXIT-RAN" not in proc.stdout


def test_without_a_process_group_the_process_ends_normally():
    proc = _run("return 3", group=False)
    assert proc.returncode == 3
    assert "ATEXIT-RAN" in proc.stdout  # plain SystemExit: atexit handlers run as usual


def test_shutdown_keeps_the_group_only_when_the_process_will_os_exit():
    script = textwrap.dedent(f"""
        import torch, torch.distributed as dist
        from cafedist import lifecycle
        from cafedist.distributed.runtime import Runtime, shutdown_runtime
        rt = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo", launcher="test")
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        lifecycle.EXIT_WITHOUT_TEARDOWN = True
        shutdown_runtime(rt)
        kept = dist.is_initialized()
        lifecycle.EXIT_WITHOUT_TEARDOWN = False
        shutdown_runtime(rt)
        print(kept, dist.is_initialized())
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env_for_tests(), capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.split() == ["True", "False"], proc.stderr[-2000:]


def test_without_a_stdout_a_bad_input_is_still_one_line_with_exit_2(tmp_path):
    """Started with stdout closed (`cafedist status X >&-`, a daemon, cron), Python's sys.stdout
    is None: print() writes nothing, but main()'s own flush before returning raised
    AttributeError, a traceback with exit 1 after the command had ended (and 0 became 1)."""
    proc = subprocess.run(["sh", "-c", 'exec "$0" -m cafedist status "$1" >&-', sys.executable, str(tmp_path)],
                          cwd=ROOT, env=env_for_tests(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("cafedist: error: ") and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_streams_are_flushed_before_os_exit_whatever_state_they_are_in(monkeypatch):
    """Before os._exit (a multi-rank command's end) both streams are flushed: a rank started
    with stdout closed has sys.stdout None, and a reader gone makes flush raise; neither may
    turn a finished rank into a traceback."""
    from cafedist import cli

    class GoneReader:
        flushed = 0

        def flush(self):
            GoneReader.flushed += 1
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", None)
    monkeypatch.setattr(sys, "stderr", GoneReader())
    cli._flush_standard_streams()
    assert GoneReader.flushed == 1


def test_the_progress_line_writes_to_the_stderr_of_the_moment(monkeypatch):
    """The stream is looked up when a run starts, not when the module was imported: an
    embedding program (or a test harness) that replaced and closed sys.stderr since made
    train fail before its first round; a disabled progress line touches no stream at all."""
    import io

    from cafedist.train.progress import Progress

    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stderr", closed)
    Progress(3, enabled=False).update(1)  # a rank other than 0, or --no-progress
    now = io.StringIO()
    monkeypatch.setattr(sys, "stderr", now)
    bar = Progress(3)
    bar.update(3, "done")
    assert "round 3/3" in now.getvalue() and bar.stream is now
