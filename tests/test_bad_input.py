"""Bad-input corpus (issue 13): every case exits with status 2 and one line on stderr, shows no
traceback, and leaves every file of an existing run as it was (hashed before and after).

Cases run in this process through ``cafedist.cli.main`` against one finished tiny run created
once per module (cases that need a damaged run get a private copy); most fail before any
training. One case goes through the real entry point (``python -m cafedist``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from conftest import ROOT, env_for_tests, fake_slurm
from test_run_dir import run_cli, train_tiny_run, tree_hashes

from cafedist.config import load_config
from cafedist.rundir import RunLock


@dataclass
class Ctx:
    """Paths a case may use: ``run`` is the finished run (or the case's damaged copy of it)."""

    cfg: Path
    run: Path
    store: Path
    tmp: Path

    @property
    def fresh(self) -> Path:
        """A run directory that does not exist and must not be created."""
        return self.tmp / "fresh-run"


@dataclass
class Case:
    name: str
    argv: Callable[[Ctx], list[str]]
    needle: str  # must appear in the one error line
    env: dict[str, str] = field(default_factory=dict)
    damage: Callable[[Ctx], None] | None = None  # applied to a private copy of the run first
    hold_lock: bool = False  # a live writer holds the run directory


def train(*extra: str, out: str = "run") -> Callable[[Ctx], list[str]]:
    def argv(c: Ctx) -> list[str]:
        target = {"run": str(c.run), "fresh": str(c.fresh)}.get(out, out)
        return ["train", "--config", str(c.cfg), "--out", target, "--no-progress", *extra]
    return argv


def fresh(*extra: str) -> Callable[[Ctx], list[str]]:
    return train(*extra, out="fresh")


def prepare(c: Ctx, *extra: str, out: str | None = None) -> list[str]:
    """``prepare`` of a small digits store into the case's scratch folder, with ``extra`` flags last."""
    target = str(c.tmp / "prepared.h5") if out is None else out
    return ["prepare", "--dataset", "digits", "--clients", "3", "--alpha", "0.3", "--proxy-fraction", "0.1",
            "--out", target, *extra]


def flip_byte(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    path.write_bytes(bytes(data))


def corrupt_all_checkpoints(c: Ctx) -> None:
    for f in (c.run / "checkpoints").glob("round_*/client_00000.pt"):
        flip_byte(f)


def corrupt_newest(c: Ctx) -> None:
    flip_byte(c.run / "checkpoints" / "round_000001" / "client_00001.pt")


def config_yaml_a_folder(c: Ctx) -> None:
    (c.run / "config.yaml").unlink()
    (c.run / "config.yaml").mkdir()


def bad_config_yaml(c: Ctx) -> None:
    (c.run / "config.yaml").write_text("train: {rounds: [\n")


def flipped_store(c: Ctx) -> None:
    shutil.copy(c.store, c.tmp / "flipped.h5")
    import h5py

    with h5py.File(c.tmp / "flipped.h5", "r") as f:
        offset = f["clients/00001/x_train"].id.get_offset()
    data = bytearray((c.tmp / "flipped.h5").read_bytes())
    data[offset + 3] ^= 0xFF
    (c.tmp / "flipped.h5").write_bytes(bytes(data))


def files(c: Ctx) -> None:
    (c.tmp / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    if not (c.tmp / "fifo.yaml").exists():
        os.mkfifo(c.tmp / "fifo.yaml")
    (c.tmp / "repeated.yaml").write_text("train:\n  rounds: 2\n  lr: 0.1\n  rounds: 3\n")
    (c.tmp / "date.yaml").write_text("seed: 2024-01-01\n")
    (c.tmp / "natural.yaml").write_text("data: {dataset: femnist, partition: natural, proxy_users: 3}\n")
    (c.tmp / "cycle.yaml").write_text("model:\n  options: &o {width: [*o]}\n")
    (c.tmp / "deep.yaml").write_text("model:\n  options:\n    x: " + "[" * 3000 + "]" * 3000 + "\n")
    (c.tmp / "tagged.yaml").write_text("data:\n  options: !!binary aGk=\n")
    (c.tmp / "list.yaml").write_text("- a\n- b\n")
    (c.tmp / "blank.yaml").write_text("# my experiment: settings to come\n")  # truncated, or never filled in
    (c.tmp / "afile").write_text("x")
    (c.tmp / "adir").mkdir(exist_ok=True)
    (c.tmp / "truncated.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)


CASES = [
    # -- config: values, fields, overrides (item 6: nonsense accepted; items 1-2: failed restarts)
    Case("item1-resume-none-unknown-arch", train("--resume", "none", "model.arch=cnnn"), "model.arch"),
    Case("item2-resume-force-typo-option", train("--resume", "force", "model.options.widht=4"), "model.options.widht"),
    Case("item2-resume-force-model-misfit", train("--resume", "force", "model.options.width=8"), "does not fit"),
    # with a bound the shards are parked, not loaded: the misfit must still be found at the resume
    Case("resume-force-model-misfit-bounded",
         train("--resume", "force", "model.options.width=8", "train.resident_clients=1", "train.rounds=3"),
         "does not fit"),
    # another algorithm's client state means something else (or nothing) to this one
    Case("resume-force-another-algorithm",
         train("--resume", "force", "algorithm.name=fedpac", "train.rounds=3"), "a run of algorithm cafedistill"),
    Case("resume-force-another-algorithm-bounded",
         train("--resume", "force", "algorithm.name=dsfl", "train.rounds=3", "train.resident_clients=2",
               "train.client_state=disk"), "a run of algorithm cafedistill"),
    Case("item6-lr-inf", fresh("train.lr=.inf"), "train.lr"),
    Case("lr-nan", fresh("train.lr=.nan"), "train.lr"),
    Case("item6-clients-per-round-above-clients", fresh("train.clients_per_round=10"), "train.clients_per_round"),
    Case("mu-inf", train("algorithm.cafedistill.mu=-.inf"), "algorithm.cafedistill.mu"),
    Case("exit-weights-all-zero", fresh("algorithm.cafedistill.exit_weights=[0, 0, 0]"),
         "exit_weights: expected a list of 3 finite non-negative numbers (one per exit, not all 0)"),
    Case("exit-weights-inf", fresh("algorithm.cafedistill.exit_weights=[1, .inf, 1]"),
         "algorithm.cafedistill.exit_weights"),
    Case("clients-per-round-fractional-count", train("train.clients_per_round=2.5"), "train.clients_per_round"),
    Case("momentum-negative", train("train.momentum=-0.5"), "train.momentum"),
    Case("rounds-zero", train("train.rounds=0"), "train.rounds"),
    Case("rounds-float", train("train.rounds=1.5"), "train.rounds"),
    Case("rounds-beyond-64-bit", train("train.rounds=100000000000000000000000"), "train.rounds"),
    Case("alpha-negative", fresh("data.alpha=-1"), "data.alpha"),
    Case("cache-dir-empty", fresh("data.cache_dir="), "data.cache_dir: empty"),
    Case("dataset-unknown", fresh("data.dataset=nosuch"), "data.dataset: unknown dataset 'nosuch'"),
    Case("override-blamed-not-the-file", train("train.rounds="), "override 'train.rounds=': train.rounds: expected"),
    Case("override-making-another-field-wrong",
         lambda c: ["train", "--config", str(c.tmp / "natural.yaml"), "--out", str(c.fresh),
                    "data.partition=dirichlet"],
         "natural.yaml with overrides data.partition=dirichlet: data.proxy_users: applies only to"),
    Case("section-without-keys", train("algorithm.fedavg.nosuch=1"), "unknown key (this section takes no keys)"),
    Case("store-empty", fresh("data.store=''"), "data.store: empty"),
    Case("algorithm-unknown", train("algorithm.name=nope"), "algorithm.name"),
    Case("algorithm-param-unknown", train("algorithm.cafedistill.bogus=1"), "algorithm.cafedistill.bogus"),
    Case("train-key-unknown", train("train.bogus=1"), "train.bogus"),
    Case("model-option-out-of-range", fresh("model.options.width=0"), "model.options.width"),
    Case("model-beyond-memory", fresh("model.options.width=99999999999"),
         "could not be allocated (can't allocate memory"),
    Case("model-beyond-any-size", fresh("model.options.width=100000000000000000000"),
         "is too large to build (empty(): argument"),
    Case("item7-transformer-on-images", fresh("model.arch=transformer"), "takes text datasets"),
    Case("timeout-zero", train("dist.timeout_s=0"), "dist.timeout_s"),
    Case("device-misspelt", train("dist.device=gpu"), "dist.device: expected auto, cpu, cuda or cuda:N"),
    Case("keep-zero", train("checkpoint.keep=0"), "checkpoint.keep"),
    Case("seed-string", train("seed=abc"), "seed"),
    Case("override-without-value", train("train.rounds"), "KEY=VALUE"),
    Case("override-bad-yaml", train("train.rounds=["), "not valid YAML"),
    # -- YAML 1.1's surprises (audit): a repeated key, dates, base 60, cycles, tags, deep nesting
    Case("yaml-repeated-key", lambda c: ["train", "--config", str(c.tmp / "repeated.yaml"), "--out", str(c.fresh)],
         "repeated.yaml: not valid YAML at line 4 (key 'rounds' is given twice)"),
    Case("yaml-date", lambda c: ["train", "--config", str(c.tmp / "date.yaml"), "--out", str(c.fresh)],
         "seed: expected an integer"),
    Case("yaml-base-60", fresh("train.rounds=1:30"), "train.rounds: expected an integer"),
    Case("yaml-cycle", lambda c: ["train", "--config", str(c.tmp / "cycle.yaml"), "--out", str(c.fresh)],
         "refers to a node that contains it"),
    Case("yaml-deep", lambda c: ["train", "--config", str(c.tmp / "deep.yaml"), "--out", str(c.fresh)],
         "nested too deeply"),
    Case("yaml-deep-override", fresh("model.options.x=" + "[" * 3000), "nested too deeply"),
    Case("yaml-binary-tag", lambda c: ["train", "--config", str(c.tmp / "tagged.yaml"), "--out", str(c.fresh)],
         "!!binary is not plain data"),
    Case("config-empty-path", lambda c: ["train", "--config", "", "--out", str(c.fresh)], "--config: empty path"),
    Case("different-config-on-resume", train("algorithm.cafedistill.mu=2.0"), "different config"),
    Case("resume-mode-unknown", train("--resume", "maybe"), "--resume"),
    Case("option-unknown", train("--bogus"), "unrecognized arguments: --bogus"),
    # -- paths (item 7: tracebacks; item 6: --out "")
    Case("config-missing", lambda c: ["train", "--config", str(c.tmp / "none.yaml"), "--out", str(c.run)],
         "config file not found"),
    Case("item7-config-binary", lambda c: ["train", "--config", str(c.tmp / "binary.yaml"), "--out", str(c.run)],
         "not a text file"),
    Case("config-directory", lambda c: ["train", "--config", str(c.tmp / "adir"), "--out", str(c.run)],
         "is a directory"),
    Case("config-not-a-mapping", lambda c: ["train", "--config", str(c.tmp / "list.yaml"), "--out", str(c.run)],
         "expected a mapping"),
    # trained the defaults into runs/blank, as if that was what the file asked for
    Case("config-without-settings",
         lambda c: ["train", "--config", str(c.tmp / "blank.yaml"), "--out", str(c.fresh)],
         "blank.yaml: holds no settings (empty, or comments only)"),
    Case("item6-out-empty", train(out=""), "--out"),
    Case("item7-out-is-a-file", lambda c: train(out=str(c.run / "config.yaml"))(c), "exists and is not a directory"),
    Case("out-below-a-file", lambda c: train(out=str(c.run / "summary.json" / "sub"))(c), "is a file"),
    Case("item7-cache-dir-is-a-file", lambda c: fresh(f"data.cache_dir={c.run / 'config.yaml'}")(c),
         "data.cache_dir"),
    Case("store-is-a-directory", lambda c: fresh(f"data.store={c.tmp / 'adir'}")(c), "data.store"),
    Case("item7-prepare-out-is-a-directory",
         lambda c: ["prepare", "--dataset", "digits", "--clients", "3", "--alpha", "0.3", "--proxy-fraction", "0.1",
                    "--out", str(c.run)], "is a directory"),
    Case("prepare-min-size-one", lambda c: prepare(c, "--min-size", "1"), "min_size: must be >= 2"),
    Case("prepare-alpha-inf", lambda c: prepare(c, "--alpha", "inf"), "alpha: must be a finite number > 0"),
    Case("prepare-seed-beyond-64-bit", lambda c: prepare(c, "--seed", "9" * 22), "seed must be a 64-bit integer"),
    Case("prepare-out-empty", lambda c: prepare(c, out=""), "--out: empty path"),
    Case("compare-out-is-a-file", lambda c: ["compare", "--config", str(c.cfg), "--algorithms", "fedavg", "--seeds",
                                             "1", "--out", str(c.tmp / "afile")], "--out: "),
    Case("submit-folder-is-a-file", lambda c: ["submit", "--config", str(c.cfg), "--out", str(c.fresh), "--local",
                                               "--folder", str(c.tmp / "afile"), "--dry-run"], "--folder: "),
    Case("submit-out-is-a-file", lambda c: ["submit", "--config", str(c.cfg), "--out", str(c.tmp / "afile"),
                                            "--local", "--dry-run"], "--out"),
    Case("submit-onto-another-run", lambda c: ["submit", "--config", str(c.cfg), "--out", str(c.run), "--local",
                                               "--dry-run", "train.rounds=7"], "holds a run with a different config"),
    Case("submit-dataset-without-root", lambda c: ["submit", "--config", str(c.cfg), "--out", str(c.fresh), "--local",
                                                   "--dry-run", "data.dataset=cifar10"], "data.root: cifar10 needs"),
    Case("dataset-without-root", fresh("data.dataset=cifar10"), "data.root: cifar10 needs its dataset folder"),
    Case("describe-missing-store", lambda c: ["prepare", "--describe", str(c.tmp / "none.h5")], "does not exist"),
    Case("eval-not-a-run", lambda c: ["eval", str(c.tmp / "adir")], "not a run directory"),
    # -- store
    Case("store-truncated", lambda c: fresh(f"data.store={c.tmp / 'truncated.h5'}")(c), "truncated.h5"),
    Case("store-other-partition", lambda c: fresh(f"data.store={c.store}", "data.clients=5")(c), "exists with params"),
    Case("item6-describe-flipped-bytes", lambda c: ["prepare", "--describe", str(c.tmp / "flipped.h5")],
         "checksum mismatch", damage=flipped_store),
    # -- checkpoints and the run's own files
    Case("no-checkpoint-verifies", train(), "no checkpoint verifies, so this run cannot be resumed (use --resume none",
         damage=corrupt_all_checkpoints),
    Case("eval-no-checkpoint-verifies", lambda c: ["eval", str(c.run)],
         "no checkpoint verifies, so this run cannot be evaluated (every checkpoint", damage=corrupt_all_checkpoints),
    Case("item5-eval-corrupt-final-checkpoint", lambda c: ["eval", str(c.run)], "not the final round 1",
         damage=corrupt_newest),
    Case("run-config-unreadable", train(), "unreadable", damage=bad_config_yaml),
    # a run that is training: "finish it with `cafedist train`" advised a command that would be refused
    Case("eval-while-training", lambda c: ["eval", str(c.run)],
         f"not the final round 1: it is training now (pid {os.getpid()}", damage=corrupt_newest, hold_lock=True),
    Case("eval-run-config-a-folder", lambda c: ["eval", str(c.run)], "config.yaml: not a file",
         damage=config_yaml_a_folder),
    Case("config-a-fifo", lambda c: ["train", "--config", str(c.tmp / "fifo.yaml"), "--out", str(c.fresh)],
         "fifo.yaml: not a regular file"),
    Case("eval-run-config-unreadable", lambda c: ["eval", str(c.run)], "config.yaml", damage=bad_config_yaml),
    Case("item3-second-writer", train(), "in use by another cafedist train", hold_lock=True),
    Case("item3-resume-none-while-held", train("--resume", "none"), "in use", hold_lock=True),
    # -- launch environment
    Case("env-rank-not-int", train(), "RANK='abc'", env={"RANK": "abc", "WORLD_SIZE": "2"}),
    Case("env-rank-without-world-size", train(), "WORLD_SIZE", env={"RANK": "0"}),
    Case("env-rank-beyond-world", train(), "must be < WORLD_SIZE", env={"RANK": "2", "WORLD_SIZE": "2"}),
    Case("env-world-size-zero", train(), "WORLD_SIZE", env={"RANK": "0", "WORLD_SIZE": "0"}),
    Case("env-master-port", train(), "MASTER_PORT", env={"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "70000"}),
    Case("env-slurm-without-nodelist", train(), "SLURM_NODELIST",
         env={"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}),
    Case("env-mpi-without-size", train(), "OMPI_COMM_WORLD_RANK", env={"OMPI_COMM_WORLD_RANK": "0"}),
    Case("backend-nccl-on-cpu", train("--backend", "nccl", "--device", "cpu"), "nccl"),
    Case("device-unknown", train("--device", "tpu"), "device"),
    Case("world-size-without-dry-run", train("--world-size", "2"), "--world-size"),
    Case("dry-run-world-size-zero", train("--dry-run", "--world-size", "0"), "--world-size"),
    # -- eval flags (item 6: --max-loss nan overwrote eval.json; item 7: -1 gave a traceback)
    Case("item6-eval-max-loss-nan", lambda c: ["eval", str(c.run), "--max-loss", "nan"], "--max-loss"),
    Case("item7-eval-max-loss-negative", lambda c: ["eval", str(c.run), "--max-loss", "-1"], "--max-loss"),
    Case("eval-max-loss-above-one", lambda c: ["eval", str(c.run), "--max-loss", "2"], "--max-loss"),
    Case("eval-max-loss-not-a-number", lambda c: ["eval", str(c.run), "--max-loss", "abc"], "--max-loss"),
    Case("eval-device-unknown", lambda c: ["eval", str(c.run), "--device", "tpu"], "--device 'tpu' is not"),
    Case("eval-unknown-flag", lambda c: ["eval", str(c.run), "--partial"], "unrecognized arguments"),
    Case("eval-without-run-dir", lambda c: ["eval"], "run_dir"),
    # -- export (policies from eval.json's budget table; the shared run's eval had no --budget)
    Case("export-without-budget-table", lambda c: ["export", str(c.run), "--out", str(c.tmp / "exp")],
         "has no per-client budget table"),
    Case("export-out-is-the-run", lambda c: ["export", str(c.run), "--out", str(c.run), "--threshold", "0.9"],
         "exists and is not empty"),
    Case("export-out-in-checkpoints", lambda c: ["export", str(c.run), "--out", str(c.run / "checkpoints" / "x"),
                                                 "--threshold", "0.9"], "inside the run's checkpoints folder"),
    Case("export-out-a-file", lambda c: ["export", str(c.run), "--out", str(c.run / "config.yaml"),
                                         "--threshold", "0.9"], "exists and is not a directory"),
    Case("export-threshold-above-one", lambda c: ["export", str(c.run), "--out", str(c.tmp / "exp"),
                                                  "--threshold", "1.5"], "--threshold"),
    Case("export-clients-out-of-range", lambda c: ["export", str(c.run), "--out", str(c.tmp / "exp"),
                                                   "--threshold", "0.9", "--clients", "0,9"], "--clients"),
    Case("export-not-a-run", lambda c: ["export", str(c.tmp / "adir"), "--out", str(c.tmp / "exp"),
                                        "--threshold", "0.9"], "not a run directory"),
    Case("export-without-out", lambda c: ["export", str(c.run)], "--out"),
    # a mistyped RUN with --out below it was told "--out ... is inside the run directory but not directly in it"
    Case("export-mistyped-run-out-below-it", lambda c: ["export", str(c.tmp / "nosuchrun"), "--out",
                                                        str(c.tmp / "nosuchrun" / "exports" / "v1"),
                                                        "--threshold", "0.9"], "nosuchrun: not a run directory"),
    Case("command-unknown", lambda c: ["trian"], "invalid choice"),
]


@pytest.fixture(scope="module")
def shared(tmp_path_factory, store_cache) -> Ctx:
    """The finished run every case is tried against (and the files some cases name)."""
    base = tmp_path_factory.mktemp("corpus")
    cfg, run = train_tiny_run(base, store_cache)
    code, _, err = run_cli("eval", str(run))  # eval.json is part of what must not change
    assert code == 0, err
    parsed = load_config(cfg)
    store = parsed.data.store_path(parsed.seed)
    assert store.is_file()
    ctx = Ctx(cfg=cfg, run=run, store=store, tmp=base)
    files(ctx)
    return ctx


def test_corpus_size(capsys):
    names = [c.name for c in CASES]
    assert len(set(names)) == len(names)
    with capsys.disabled():
        print(f"\nbad-input corpus: {len(CASES)} cases")
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, shared: Ctx, tmp_path, monkeypatch):
    ctx = shared
    if case.damage is not None:
        ctx = Ctx(cfg=shared.cfg, run=tmp_path / "run", store=shared.store, tmp=shared.tmp)
        shutil.copytree(shared.run, ctx.run)
        case.damage(ctx)
    for k, v in case.env.items():
        monkeypatch.setenv(k, v)
    lock = RunLock(ctx.run).acquire() if case.hold_lock else None
    try:
        before = tree_hashes(ctx.run)
        code, _, err = run_cli(*case.argv(ctx))
        after = tree_hashes(ctx.run)
    finally:
        if lock is not None:
            lock.release()
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("cafedist") and "error:" in lines[0], lines[0]
    assert case.needle in lines[0], lines[0]
    assert after == before, "files of the run changed"
    assert not ctx.fresh.exists(), "a run directory was created"


@pytest.mark.parametrize("command", ["eval", "export", "status", "scaling-report"])
def test_an_empty_run_dir_is_refused_not_taken_for_the_working_directory(command, shared: Ctx, monkeypatch):
    """``cafedist eval "$RUN"`` with RUN unset, run from inside a run directory, evaluated that
    run: eval.json replaced, an earlier ``eval --budget``'s budget.csv/png removed
    (``scaling-report ""`` wrote a report of it into its parent folder)."""
    monkeypatch.chdir(shared.run)
    extra = ["--out", str(shared.tmp / "exp"), "--threshold", "0.9"] if command == "export" else []
    before = tree_hashes(shared.run)
    code, _, err = run_cli(command, "", *extra)
    assert code == 2, err
    [line] = err.strip().splitlines()
    assert "empty path; expected a run directory" in line, line
    assert tree_hashes(shared.run) == before and not (shared.tmp / "exp").exists()
    assert not (shared.run.parent / "scaling.md").exists()


SLURM_DOWN = "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)"


@pytest.mark.parametrize("target", ["fresh", "run", "compare", "folder", "folder-in-new-out"])
def test_a_refused_submission_is_one_line_and_leaves_nothing_behind(target, shared: Ctx, tmp_path, monkeypatch):
    """sbatch refusing (no controller) gave a traceback, and the attempt's submitit folder stayed
    in a new --out, in an existing run, or in compare's --out."""
    fake_slurm(tmp_path / "bin", f"echo '{SLURM_DOWN}' >&2; exit 1", monkeypatch)
    out = {"run": shared.run, "compare": tmp_path / "cmp"}.get(target, shared.fresh)
    argv = (["compare", "--config", str(shared.cfg), "--algorithms", "fedavg", "--seeds", "1", "--submit"]
            if target == "compare" else ["submit", "--config", str(shared.cfg)])
    logs = tmp_path / "logs"  # a --folder of the user's, also holding another job's files
    (logs / "123").mkdir(parents=True)
    (logs / "123" / "123_submitted.pkl").write_bytes(b"x")
    (logs / "mine.txt").write_text("mine")
    if target == "folder":
        argv.extend(["--folder", str(logs)])
    if target == "folder-in-new-out":  # the folders the attempt made go, from the new --out down
        argv.extend(["--folder", str(shared.fresh / "logs" / "x")])
    before, kept = tree_hashes(shared.run), tree_hashes(logs)
    code, _, err = run_cli(*argv, "--out", str(out))
    assert code == 2, err
    assert err.strip().splitlines() == [f"cafedist: error: job submission failed: {SLURM_DOWN}"]
    assert tree_hashes(shared.run) == before and not shared.fresh.exists()
    assert not (out / "submitit").exists()
    assert tree_hashes(logs) == kept and sorted(p.name for p in logs.iterdir()) == ["123", "mine.txt"]


def test_concurrent_submissions_take_turns(shared: Ctx, tmp_path, monkeypatch):
    """A refused attempt removes what appeared in the folder since it began: a concurrent
    submission's temporary files would count too, so submissions of a user take turns (a lock
    in the temporary directory). While another process holds it, submit waits, then goes on."""
    fake_slurm(tmp_path / "bin", f"echo '{SLURM_DOWN}' >&2; exit 1", monkeypatch)
    env = env_for_tests(TMPDIR=str(tmp_path), PATH=os.environ["PATH"])
    lock = tmp_path / f"cafedist-submit-{os.getuid()}.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys\nfrom cafedist.fsutil import exclusive_lock\n"
                               f"with exclusive_lock({str(lock)!r}, 'test'):\n print('held', flush=True)\n"
                               " sys.stdin.read()"],
                              cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        submit = subprocess.Popen([sys.executable, "-m", "cafedist", "submit", "--config", str(shared.cfg),
                                   "--out", str(tmp_path / "queued")], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # it says it waits for its turn (read before the turn is given: no fixed delay, which a
        # loaded machine may need more than) and is still waiting a moment later
        waiting = submit.stderr.readline()
        assert "waiting for another cafedist submission to finish" in waiting
        with pytest.raises(subprocess.TimeoutExpired):
            submit.wait(timeout=1)
        holder.stdin.close()
        _, err = submit.communicate(timeout=120)
    finally:
        holder.kill()
    assert submit.returncode == 2, err
    [refused] = err.strip().splitlines()
    assert refused == f"cafedist: error: job submission failed: {SLURM_DOWN}"
    assert not (tmp_path / "queued").exists()


def test_an_unreadable_sbatch_answer_keeps_the_files_a_queued_job_may_need(shared: Ctx, tmp_path, monkeypatch):
    fake_slurm(tmp_path / "bin", "echo 'Submitted batch array 4242'; exit 0", monkeypatch)
    code, _, err = run_cli("submit", "--config", str(shared.cfg), "--out", str(shared.fresh))
    assert code == 2
    [line] = err.strip().splitlines()
    assert line.startswith("cafedist: error: job submission unclear: Could not make sense of sbatch output")
    assert "a job may be queued (check squeue before submitting again" in line
    assert any((shared.fresh / "submitit").rglob("*.pkl"))  # the job's pickle stays
    shutil.rmtree(shared.fresh)  # the module's other cases need it absent


def test_bad_input_through_the_real_entry_point(shared: Ctx):
    before = tree_hashes(shared.run)
    proc = subprocess.run([sys.executable, "-m", "cafedist", "train", "--config", str(shared.tmp / "binary.yaml"),
                           "--out", str(shared.run)], cwd=ROOT, env=env_for_tests(RANK="0", WORLD_SIZE="1"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"cafedist: error: {shared.tmp / 'binary.yaml'}: not a text file "
                                        f"(expected a YAML config)"], proc.stderr
    assert tree_hashes(shared.run) == before
