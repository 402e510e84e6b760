"""An error raised on one rank only ends every rank within seconds, not after dist.timeout_s.

Rank 0's aggregate refused by ``check_rows``, or a client's ``local_loss`` raising on rank 1,
under each launch path: the failing rank prints its traceback and exits 1, and its peers,
blocked in the round's next collective, see its sockets close and exit 2 with one line. Each
run's ``dist.timeout_s`` is far above the bound on its wall time, so a peer left waiting for
the timeout fails the test instead of passing late.
"""

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, env_for_tests, free_port, mpi_env, mpiexec_cmd, torchrun

pytestmark = pytest.mark.slow

DRIVER = str(Path(__file__).with_name("failing_ranks.py"))
TIMEOUT_S = 60  # dist.timeout_s of these runs: a peer that waits for it takes over a minute
PROMPT_S = 40  # start-up and one round of a tiny run take a few seconds; generous on loaded cores
#: algorithm -> (the failing rank, how its traceback's last line starts, its peer's line as a regex)
FAILURES = {"badrows": (0, "ValueError: algorithm 'badrows': aggregate returned no 'back'",
                        # the store, which it hosted, went with it (the peer rarely asks before it goes);
                        # gloo words the closed socket as it finds it: "Connection closed by peer", or
                        # "Read error [...]: Connection reset by peer"
                        r"scatter_rows failed in round 0 on rank 1: rank 0 (has ended \((Connection closed by peer"
                        r"|Read error .*: Connection reset by peer)|failed: ValueError: algorithm 'badrows')"),
            "rank1bug": (1, "RuntimeError: client-side bug on rank 1",
                         "all_reduce_sum failed in round 0 on rank 0: rank 1 failed: RuntimeError: client-side bug "
                         "on rank 1")}


def _args(cfg: Path, out: Path, algorithm: str) -> list[str]:
    return [DRIVER, "train", "--config", str(cfg), "--out", str(out), "--no-progress",
            f"algorithm.name={algorithm}", f"dist.timeout_s={TIMEOUT_S}"]


def _spawn_two(args: list[str]) -> list[tuple[int, float, str]]:
    """Two ranks as plain processes (env:// variables); (exit status, seconds, stderr) of each."""
    port = free_port()
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, env=env_for_tests(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for r in range(2)]
    ended: dict[int, tuple[int, float, str]] = {}

    def wait(r: int) -> None:
        _, err = procs[r].communicate(timeout=3 * TIMEOUT_S)
        ended[r] = (procs[r].returncode, time.monotonic() - t0, err)

    waiters = [threading.Thread(target=wait, args=(r,)) for r in range(2)]
    for w in waiters:
        w.start()
    for w in waiters:
        w.join()
    return [ended[r] for r in range(2)]


def _errors(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("cafedist: error:")]


@pytest.mark.parametrize("algorithm", list(FAILURES))
def test_plain_ranks_end_promptly(tiny_config, tmp_path, algorithm):
    failing, last, peer = FAILURES[algorithm]
    ranks = _spawn_two(_args(tiny_config(rounds=2), tmp_path / "run", algorithm))
    status, _, err = ranks[failing]
    assert status == 1 and err.rstrip().splitlines()[-1].startswith(last), err[-3000:]
    status, _, err = ranks[1 - failing]
    assert status == 2 and len(_errors(err)) == 1, err[-3000:]
    assert re.match(f"cafedist: error: {peer}", _errors(err)[0]), err[-3000:]
    assert "Exception raised from" not in err, err[-3000:]  # no C++ stack of the store's gone host
    assert max(seconds for _, seconds, _ in ranks) < PROMPT_S


def test_torchrun_ends_promptly(tiny_config, tmp_path):
    t0 = time.monotonic()
    proc = subprocess.run(torchrun(2) + _args(tiny_config(rounds=2), tmp_path / "run", "badrows"), cwd=ROOT,
                          env=env_for_tests(), capture_output=True, text=True, timeout=3 * TIMEOUT_S)
    assert proc.returncode != 0
    assert FAILURES["badrows"][1] in proc.stderr, proc.stderr[-3000:]
    # torchrun's agent hosts the store: the peer names rank 0 and its error
    peer = "cafedist: error: scatter_rows failed in round 0 on rank 1: rank 0 failed: ValueError: algorithm 'badrows'"
    assert [ln for ln in _errors(proc.stderr) if ln.startswith(peer)], proc.stderr[-3000:]
    assert "Exception raised from" not in proc.stderr, proc.stderr[-3000:]
    assert time.monotonic() - t0 < PROMPT_S


@pytest.mark.mpi
def test_mpiexec_ends_promptly(tiny_config, tmp_path):
    """The failing rank does not finalize MPI: MPI_Finalize waited for its peers, which waited
    in gloo for its sockets to close, so the job ended only after dist.timeout_s."""
    cmd = mpiexec_cmd(2)
    if cmd is None:
        pytest.skip("no mpiexec next to sys.executable or on PATH")
    t0 = time.monotonic()
    proc = subprocess.run(cmd + _args(tiny_config(rounds=2), tmp_path / "run", "badrows"), cwd=ROOT,
                          env=mpi_env(), capture_output=True, text=True, timeout=3 * TIMEOUT_S)
    assert proc.returncode != 0
    assert FAILURES["badrows"][1] in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    assert time.monotonic() - t0 < PROMPT_S


def test_a_failure_left_in_the_store_names_the_rank_and_its_error():
    """In one process, over a store of its own: the word a failed rank leaves replaces a
    collective's reason, a timeout keeps its own, and a new run forgets it."""
    import torch.distributed as dist

    from cafedist.distributed.runtime import explain_peer_failure, forget_failure, report_failure

    closed = "Connection closed by peer [127.0.0.1]:1234"
    assert explain_peer_failure(closed) == closed  # no process group
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert explain_peer_failure(closed) == closed
        report_failure(3, KeyError("no such row"))
        assert explain_peer_failure(closed) == "rank 3 failed: KeyError: 'no such row'"
        timed_out = "Timed out waiting 60000ms for recv operation to complete"
        assert explain_peer_failure(timed_out) == timed_out
        forget_failure()
        assert explain_peer_failure(closed) == closed
    finally:
        dist.destroy_process_group()


def test_gloo_advice_is_left_out_of_the_reason():
    from cafedist.distributed.runtime import short_reason

    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                        "[127.0.0.1]:32166. This is typically caused by a remote worker crashing")
    assert short_reason(gloo) == "Connection closed by peer [127.0.0.1]:32166"
