"""Benchmarks and the code they made faster: packed == sequential training, optimised
aggregation == the float64 reference, and every benchmark's rows."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cafedist.algorithms.base import Setup
from cafedist.algorithms.cafedistill import CAFEDistill, CAFEDistillParams
from cafedist.algorithms.proxy_math import cosine_similarity_rows, healthy_clients, mix_targets, project_rows_to_simplex
from cafedist.algorithms.students import student_masks
from cafedist.bench import run_benchmark
from cafedist.bench.aggregate import synthetic_logits
from cafedist.bench.report import format_table, render
from cafedist.bench.synthetic import clone_cohort, make_cohort
from cafedist.bench.timing import interleaved, paired_speed_ratio, peak_rss_delta, resolve_device
from cafedist.cli import main as cli_main
from cafedist.run.client import make_optimizer
from cafedist.train.local import local_update
from cafedist.train.packed import pack_blocker, packed_local_update


# ----------------------------------------------------------------------------- packed training
def _small_cohort(scenario, sizes=(17, 8, 30, 3, 16), seed=0):
    cohort = make_cohort(len(sizes), list(sizes), scenario, shape=(1, 12, 12), width=4, num_classes=5,
                         proxy_size=12, batch_size=8, proxy_batch_size=4, local_epochs=2, seed=seed)
    if scenario == "kd":  # two student patterns: the packed trainer must group by them
        for c in cohort.clients:
            c.state["students"] = torch.tensor([c.cid % 2 == 0, False, True])
    return cohort


def _assert_same_clients(a, b, atol=1e-5):
    for ca, cb in zip(a.clients, b.clients):
        for (name, pa), pb in zip(ca.model.named_parameters(), cb.model.parameters()):
            assert torch.allclose(pa, pb, atol=atol), (ca.cid, name, float((pa - pb).abs().max()))
        sa, sb = ca.optimizers["main"].state, cb.optimizers["main"].state
        assert len(sa) == len(sb)  # same parameters have momentum buffers (skipped heads have none)
        for pa, pb in zip(ca.model.parameters(), cb.model.parameters()):
            if pa in sa:
                assert torch.allclose(sa[pa]["momentum_buffer"], sb[pb]["momentum_buffer"], atol=atol)


@pytest.mark.parametrize("scenario", ["ce", "kd"])
def test_packed_training_equals_sequential_training(scenario):
    seq = _small_cohort(scenario)
    pack = clone_cohort(seq)
    for rnd in range(3):  # several rounds: momentum buffers carry over between calls
        ls = [local_update(c, seq.algo, seq.train, rnd, 7, seq.proxy_x, seq.proxy_idx) for c in seq.clients]
        lp = packed_local_update(pack.clients, pack.algo, pack.train, rnd, 7, pack.proxy_x, pack.proxy_idx)
        assert lp == pytest.approx(ls, abs=1e-5)
    _assert_same_clients(seq, pack)
    # and training moved the weights (the comparison is not between two untouched models)
    fresh = _small_cohort(scenario)
    assert not torch.allclose(fresh.clients[0].model.heads[-1][-1].weight, seq.clients[0].model.heads[-1][-1].weight)


def test_packed_accepts_per_client_proxy_indices():
    seq = _small_cohort("kd", sizes=(9, 14, 5))
    pack = clone_cohort(seq)
    idx = [seq.proxy_idx, seq.proxy_idx.flip(0), seq.proxy_idx[:6]]
    ls = [local_update(c, seq.algo, seq.train, 0, 1, seq.proxy_x, i) for c, i in zip(seq.clients, idx)]
    lp = packed_local_update(pack.clients, pack.algo, pack.train, 0, 1, pack.proxy_x, idx)
    assert lp == pytest.approx(ls, abs=1e-5)
    _assert_same_clients(seq, pack)


def test_pack_blocker_names_what_prevents_packing():
    cohort = _small_cohort("ce", sizes=(8, 8))
    assert pack_blocker(cohort.clients, cohort.algo) is None
    c = cohort.clients[1]
    c.models["main"].blocks[0].append(nn.Dropout(0.1))
    assert "dropout" in pack_blocker(cohort.clients, cohort.algo)
    c.models["main"].blocks[0][-1] = nn.BatchNorm2d(4)
    assert "buffers" in pack_blocker(cohort.clients, cohort.algo)
    other = _small_cohort("ce", sizes=(8, 8))
    other.clients[1].models["main"] = make_cohort(1, 8, "ce", shape=(1, 12, 12), width=6,
                                                   num_classes=5).clients[0].model
    other.clients[1].optimizers["main"] = make_optimizer(other.clients[1].model, other.train)
    assert "architecture" in pack_blocker(other.clients, other.algo)
    with pytest.raises(ValueError, match="cannot pack"):
        packed_local_update(other.clients, other.algo, other.train, 0, 0)


def test_kl_rewrite_is_exactly_torch_kl_div():
    from cafedist.algorithms.proxy_math import kl_batchmean

    g = torch.Generator().manual_seed(0)
    log_q = F.log_softmax(torch.randn(16, 7, generator=g) * 3, dim=1)
    p = torch.softmax(torch.randn(16, 7, generator=g) * 4, dim=1)
    p[0, 0] = 0.0
    assert torch.equal(kl_batchmean(log_q, p), F.kl_div(log_q, p, reduction="batchmean"))


# ----------------------------------------------------------------------------- aggregation
def _reference_aggregate(algo, rnd, logits, active):
    """The straightforward float64 aggregation the optimised code must reproduce."""
    p, n, m = algo.params, logits.shape[0], logits.shape[1]
    last = logits[:, m - 1].double()
    flat = logits.reshape(n, -1)
    finite = torch.isfinite(flat).all(1) & (torch.nan_to_num(flat.abs(), nan=float("inf")).amax(1) <= p.logit_bound)
    healthy = finite & active
    safe = torch.where(healthy.view(n, 1, 1), last, torch.zeros_like(last))
    q = torch.softmax(safe, 2).reshape(n, -1)
    qn = q / q.norm(dim=1, keepdim=True)
    sim = qn @ qn.T
    w = algo.setup.data_weights * healthy
    w = w / w.sum()
    d = torch.where(healthy[:, None] & healthy[None, :], 1 - sim, torch.zeros_like(sim))
    alpha = project_rows_to_simplex(w[None] - d / (2 * p.mu), active=healthy)
    probs = torch.where(healthy.view(n, 1, 1), torch.softmax(safe / p.tau, 2), torch.zeros_like(safe))
    targets = (alpha @ probs.reshape(n, -1)).reshape(probs.shape).float()
    students = student_masks(rnd + 1, algo.setup.rounds, n, m, sim, p.schedule_span, healthy)
    return targets, students, alpha


def _algo(n, m, proxy, classes, **params):
    setup = Setup(num_clients=n, num_exits=m, num_classes=classes, rounds=12,
                  train_sizes=tuple(20 + 3 * i for i in range(n)), seed=0, proxy_size=proxy)
    return CAFEDistill(CAFEDistillParams(proxy_size=proxy, **params), setup)


@pytest.mark.parametrize("rnd", [1, 4])
def test_optimised_aggregation_matches_the_float64_reference(rnd):
    n, m, proxy, classes = 24, 3, 15, 6
    logits = synthetic_logits(n, m, proxy, classes, seed=rnd)
    logits[3, 0, 2, 1] = float("nan")  # quarantined
    logits[7, 1, 0, 0] = 5e4  # exploding
    active = torch.ones(n, dtype=torch.bool)
    active[11] = False  # stale: teaches no one
    algo = _algo(n, m, proxy, classes)
    payload, report = algo.aggregate_logits(rnd, logits, active)
    targets, students, alpha = _reference_aggregate(algo, rnd, logits, active)
    assert torch.allclose(payload["targets"], targets, atol=1e-5)
    assert torch.equal(payload["students"].bool(), students)
    assert report["quarantined"] == [3, 7]
    assert report["self_weight"] == pytest.approx(float(alpha.diagonal().mean()), abs=1e-5)
    assert torch.allclose(payload["targets"].sum(2)[active & (torch.arange(n) != 3)], torch.ones(1), atol=1e-5)


def test_similarity_is_symmetric_and_row_blocks_agree():
    g = torch.Generator().manual_seed(0)
    q = torch.rand(70, 40, generator=g)
    full = cosine_similarity_rows(q, block=16)  # several blocks of the symmetric scheme
    assert torch.equal(full, full.T)
    assert torch.equal(full.diagonal(), torch.ones(70, dtype=torch.float64))
    ref = torch.nn.functional.normalize(q.double(), dim=1) @ torch.nn.functional.normalize(q.double(), dim=1).T
    assert torch.allclose(full, ref, atol=1e-5)


class _SkewedProducts(torch.Tensor):
    """A tensor whose matrix products come back with the entries below the diagonal one ulp up:
    what a BLAS kernel may legally return for q_b @ q_b.T (seen on AMD EPYC)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs or {})
        if func in (torch.Tensor.__matmul__, torch.matmul, torch.Tensor.matmul, torch.mm):
            with torch._C.DisableTorchFunctionSubclass():
                below = torch.ones(out.shape, dtype=torch.bool).tril(-1)
                out = torch.where(below, torch.nextafter(out, torch.full_like(out, float("inf"))), out)
            out = out.as_subclass(cls)
        return out


def test_similarity_is_symmetric_even_when_blas_products_are_not():
    q = torch.rand(70, 40, generator=torch.Generator().manual_seed(0))
    skewed = q.as_subclass(_SkewedProducts)
    block = skewed[:16] @ skewed[:16].T
    assert not torch.equal(block.as_subclass(torch.Tensor), block.as_subclass(torch.Tensor).T)  # the stand-in works
    full = cosine_similarity_rows(skewed, block=16).as_subclass(torch.Tensor)
    assert torch.equal(full, full.T)
    plain = cosine_similarity_rows(q, block=16)
    upper = torch.ones(70, 70, dtype=torch.bool).triu()
    assert torch.equal(full[upper], plain[upper])  # only the mirrored lower triangle was affected


@pytest.mark.parametrize("clusters", [1, 3, 5, 40, "big"])
def test_block_sparse_mixture_equals_the_dense_product(clusters):
    g = torch.Generator().manual_seed(1)
    n = 40
    # "big": one cluster of 25 (a block using more than half the teachers: the plain-product
    # branch) beside 15 clients on their own, 40 % non-zero overall (the block-sparse path)
    group = torch.where(torch.arange(n) < 25, 0, torch.arange(n)) if clusters == "big" else torch.arange(n) % clusters
    alpha = (group[:, None] == group[None, :]).double() * torch.rand(n, n, generator=g, dtype=torch.float64)
    alpha = alpha / alpha.sum(1, keepdim=True)
    probs = torch.softmax(torch.randn(n, 6, 4, generator=g), dim=2)
    dense = (alpha @ probs.double().reshape(n, -1)).reshape(n, 6, 4).float()
    assert torch.allclose(mix_targets(alpha, probs, block=8), dense, atol=1e-6)
    assert torch.allclose(mix_targets(alpha[5:9], probs, block=8), dense[5:9], atol=1e-6)


def test_health_check_catches_nan_inf_and_large_values_anywhere():
    x = torch.zeros(5, 3, 4, 2)
    x[1, 2, 3, 1] = float("nan")
    x[2, 0, 0, 0] = float("-inf")
    x[3, 1, 1, 1] = -2e4
    x[4, 1, 1, 1] = 9e3
    assert healthy_clients(x, 1e4).tolist() == [True, False, False, False, True]
    assert healthy_clients(x, float("inf")).tolist() == [True, False, False, True, True]


# ----------------------------------------------------------------------------- benchmark rows
def test_bench_local_rows():
    rows = run_benchmark("local", quick=True, repeats=2, n_train=48)
    assert [r["scenario"] for r in rows] == ["ce", "kd"]
    for r in rows:
        assert r["benchmark"] == "local" and r["samples_per_s"] > 0 and r["plain_samples_per_s"] > 0
        assert 0.2 < r["ratio_vs_plain"] < 5  # same work on both sides


def test_bench_packed_rows_and_equality():
    rows = run_benchmark("packed", quick=True, ks=(2, 3), n_train=12, repeats=1)
    assert [r["k"] for r in rows] == [2, 3]
    for r in rows:
        assert r["speedup_vs_sequential"] > 0 and r["packed_samples_per_s"] > 0
        assert r["max_param_diff"] < 1e-5


def test_bench_exits_rows():
    rows = run_benchmark("exits", quick=True, repeats=2, batches=(1, 3),
                         models=(("cnn-tiny", "cnn", (1, 8, 8), {"width": 4}),))
    assert [(r["batch"], r["exit"]) for r in rows] == [(1, 1), (1, 2), (1, 3), (3, 1), (3, 2), (3, 3)]
    for batch in (1, 3):
        fractions = [r["macs_fraction"] for r in rows if r["batch"] == batch]
        assert fractions == sorted(fractions) and 0 < fractions[0] < 1 == fractions[-1]
    for r in rows:
        assert r["ms_per_batch"] > 0 and r["eager_ms_per_batch"] > 0 and r["time_fraction"] > 0


def test_bench_aggregate_rows_and_memory():
    rows = run_benchmark("aggregate", quick=True, sizes=(16, 48), proxy=20, classes=10, repeats=1, memory=False)
    rows += run_benchmark("aggregate", quick=True, sizes=(24,), proxy=20, classes=10, repeats=1)
    assert [r["n"] for r in rows] == [16, 48, 24]
    for r in rows:
        assert r["time_s"] > 0 and r["matmul_s"] > 0 and r["ratio_vs_matmul"] > 0
        assert 0 < r["alpha_density"] <= 1
    import sys
    if sys.platform.startswith("linux"):  # measured in a fresh process; at least the targets it returns
        assert rows[2]["peak_mb"] >= 24 * 20 * 10 * 4 / 2**20


def test_bench_comm_counts_bytes_exactly():
    rows = run_benchmark("comm", arch="cnn", input_shape=(1, 28, 28), classes=10, proxy=100)
    by = {(r["comm_exits"], r["logits_dtype"]): r for r in rows}
    r32 = by[("all", "float32")]
    m, n_params = r32["m"], r32["n_params"]
    assert r32["bytes_up"] == m * 100 * 10 * 4
    assert r32["bytes_down"] == 100 * 10 * 4 + m  # targets float32 + student mask uint8
    assert r32["fedavg_bytes_per_client_per_round"] == 8 * n_params
    assert by[("all", "float16")]["bytes_up"] == r32["bytes_up"] // 2
    assert by[("used", "float32")]["bytes_up"] == r32["bytes_up"] // m  # CAFEDistill reads the last exit
    assert r32["ratio_vs_fedavg"] == pytest.approx((r32["bytes_up"] + r32["bytes_down"]) / (8 * n_params), rel=1e-3)


def test_bench_comm_resnet18_default_exchange_meets_the_target():
    rows = run_benchmark("comm")
    default = [r for r in rows if r["comm_exits"] == "used"]
    assert {r["logits_dtype"] for r in default} == {"float32", "float16"}
    for r in default:
        assert r["arch"] == "resnet18" and r["proxy"] == 1000 and r["classes"] == 100
        assert r["ratio_vs_fedavg"] <= 0.02, r


def test_cli_bench_prints_one_json_object_per_row(capsys):
    assert cli_main(["bench", "comm", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(json.loads(line)["benchmark"] == "comm" for line in lines)
    assert cli_main(["bench", "comm", "--device", "cpu"]) == 2  # one-line user error


def test_scaling_bench_config_is_a_valid_run_config(tmp_path):
    from cafedist.bench.scaling import tiny_config
    from cafedist.config import config_from_dict

    cfg = config_from_dict(tiny_config(4, 3, str(tmp_path)))
    assert cfg.data.clients == 4 and cfg.train.rounds == 3 and cfg.dist.backend == "gloo"


def test_scaling_bench_run_that_overruns_is_one_line(tmp_path):
    """A torchrun that outlasted its time (a rendezvous that hangs, a box under heavy load)
    raised subprocess.TimeoutExpired: a traceback, exit 1. Now a DistError (one line) naming
    the world size; subprocess.run has killed torchrun, whose ranks die with it."""
    from cafedist.bench.scaling import run_torchrun
    from cafedist.errors import DistError

    config = tmp_path / "w1.yaml"
    config.write_text("seed: 0\n")
    with pytest.raises(DistError, match=r"^bench scaling: torchrun with 1 rank\(s\) took over 0.01 s"):
        run_torchrun(1, config, tmp_path / "w1", timeout=0.01)  # torchrun takes longer to import torch


# ----------------------------------------------------------------------------- helpers
def test_interleaved_alternates_and_paired_ratio():
    calls = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4 and len(times["a"]) == 3
    assert paired_speed_ratio([1.0, 2.0, 1.0], [2.0, 4.0, 20.0]) == 2.0  # median of 2, 2, 20


def test_interleaved_synchronizes_around_every_timed_run():
    events = []
    interleaved({"a": lambda: events.append("a")}, repeats=2, warmup=1, sync=lambda: events.append("sync"))
    assert events == ["a", "sync", "a", "sync", "sync", "a", "sync"]  # clock starts and stops after a sync


def test_bench_device_resolution_and_errors(capsys):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert cli_main(["bench", "comm", "--device", "cpu"]) == 2
    assert "--device" in capsys.readouterr().err
    assert cli_main(["bench", "local", "--device", "tpu"]) == 2
    assert "expected 'auto', 'cpu', 'cuda' or 'cuda:N'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli_main(["bench", "packed", "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    rows = run_benchmark("local", quick=True, repeats=1, n_train=16, scenarios=("ce",), device="cpu")
    assert rows[0]["device"] == "cpu"


def test_peak_rss_delta_sees_torch_allocations():
    from cafedist.bench.timing import peak_memory_supported

    if not peak_memory_supported():  # there the benchmarks print no peak (None)
        pytest.skip("this OS cannot reset and read the peak RSS (/proc/self/clear_refs, VmHWM)")
    with peak_rss_delta() as mem:
        x = torch.ones(8_000_000)  # 32 MB
        del x
    assert mem["bytes"] is not None and mem["bytes"] > 16 * 2**20


def test_table_and_json_rendering():
    rows = [{"benchmark": "x", "n": 1, "ratio": 0.123456}, {"benchmark": "x", "n": 10, "extra": "y"}]
    text = render(rows, as_json=False)
    assert text.startswith("== bench x") and "0.1235" in text and "extra" in text
    assert [json.loads(line)["n"] for line in render(rows, as_json=True).splitlines()] == [1, 10]
    assert format_table([]) == "(no results)"


def test_bench_memory_rows(tmp_path, monkeypatch):
    """Two tiny synthetic runs in child processes: peak RSS read back, the ratio row, the
    residency sweep's identical-models check."""
    from cafedist.bench import memory

    # one round each (the benchmark's 3 by default): a child's peak RSS, its round's seconds and
    # the ratio row are read back all the same (about 4 s less)
    configured = memory.synthetic_config
    monkeypatch.setattr(memory, "synthetic_config", lambda clients, cache_dir: configured(clients, cache_dir, rounds=1))
    rows = run_benchmark("memory", sizes=(20, 40), workdir=tmp_path, bounds=())
    sizes = [r for r in rows if "clients" in r]
    assert [r["clients"] for r in sizes] == [20, 40]
    assert all(r["rss_mb"] > 50 and r["round_s"] > 0 and r["resident"] == 16 for r in sizes)
    ratio = next(r["rss_ratio_40_vs_20"] for r in rows if "rss_ratio_40_vs_20" in r)
    assert ratio == round(sizes[1]["rss_mb"] / sizes[0]["rss_mb"], 3)


def test_bench_memory_stopped_leaves_no_training_behind(tmp_path, monkeypatch):
    """Ctrl-C, SIGTERM (`timeout`, Slurm) or SIGUSR1 while `bench memory` waits for a training
    child unwind it as a KeyboardInterrupt: the child, which is no rank of a launcher and does
    not watch its parent, was left training on its own (reparented to init, for minutes, in a
    temporary folder the bench then deleted). Now it is killed and reaped before the bench ends."""
    import subprocess

    from cafedist.bench import memory

    started = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    def interrupted(_seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(memory.subprocess, "Popen", popen)
    monkeypatch.setattr(memory.time, "sleep", interrupted)  # the signal arrives while it waits
    with pytest.raises(KeyboardInterrupt):
        memory.train_child(memory.synthetic_config(20, str(tmp_path / "stores")), tmp_path / "run", threads=1)
    assert len(started) == 1
    child = started[0]
    try:
        assert child.returncode is not None, "the training child still runs"
    finally:
        if child.returncode is None:
            child.kill()
            child.wait()


def test_threads_beyond_the_cpus_are_one_line(capsys):
    """`--threads 99999999999` ended in a traceback from torch (exit 1), and a count above the
    CPUs this process may use was taken as given: its threads then share cores, which times
    the sharing (docs/PERFORMANCE.md: 15x slower steps), not the code."""
    import os

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    for threads in (str(cpus + 1), "99999999999"):
        assert cli_main(["bench", "comm", "--threads", threads]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"cafedist: error: --threads: {threads} is more than the {cpus} ")
    assert cli_main(["bench", "comm", "--threads", str(cpus), "--json"]) == 0


def test_every_row_says_the_load_it_was_measured_under(capsys, monkeypatch):
    """`bench scaling` and `bench memory` time their runs one after another, not alternately,
    and every benchmark prints absolute times too: load from other work skews them, and the
    rows said nothing of it (docs/PERFORMANCE.md noted the load by hand). Each row now carries
    the 1-minute load average before and after the benchmark."""
    import os

    loads = iter([(0.25, 0, 0), (1.5, 0, 0)])
    monkeypatch.setattr(os, "getloadavg", lambda: next(loads))
    assert cli_main(["bench", "comm", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows and all(r["load_1m"] == [0.25, 1.5] for r in rows)


def test_bench_aggregate_child_that_fails_is_one_line(monkeypatch, capsys):
    """The peak-memory child of `bench aggregate` killed (the OOM killer at n = 1,024 on a small
    node) or failing raised CalledProcessError: a traceback, exit 1. Now one line naming the
    size it measured and how the child ended."""
    import subprocess

    from cafedist.bench import aggregate
    from cafedist.errors import CafeError

    def killed(cmd, **kwargs):
        raise subprocess.CalledProcessError(-9, cmd, output="", stderr="")

    monkeypatch.setattr(aggregate.subprocess, "run", killed)
    with pytest.raises(CafeError, match=r"bench aggregate: the peak-memory run at n = 8 failed \(killed by signal 9"):
        aggregate.peak_in_subprocess(8, 2, 4, 3, 3)


def test_bench_scaling_refuses_threads_it_would_not_use(capsys):
    """Its ranks always train with one thread: --threads 2 was accepted and silently ignored."""
    assert cli_main(["bench", "scaling", "--threads", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cafedist: error: --threads: `cafedist bench scaling` runs every rank "
                                               "with 1 thread"), err


def test_bench_memory_without_the_quickstart_config_says_so(tmp_path):
    """A package installed without its checkout has no configs/: the bound sweep measured the
    defaults (another model) and labelled the rows 'quick-start model'."""
    from cafedist.bench.memory import quickstart_config
    from cafedist.errors import CafeError

    with pytest.raises(CafeError, match="quickstart.yaml is missing; the bound sweep measures the quick-start model"):
        quickstart_config(str(tmp_path), path=tmp_path / "quickstart.yaml")
    raw = quickstart_config(str(tmp_path))  # the checkout's: its model, 40 clients
    assert raw["model"]["options"]["width"] == 16 and raw["data"]["clients"] == 40
