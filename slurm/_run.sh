# shellcheck shell=bash
# Shared logic of the cafedist sbatch templates. Sourced by them, never run or submitted itself.
#
# Provides two launchers, each of which runs `cafedist train` under this job's allocation,
# forwards preemption signals, and requeues the job when the trainer asks for it:
#   cafedist_srun_train       srun: one task (= one rank) per GPU or CPU slot
#   cafedist_torchrun_train   srun: one torchrun per node, torchrun starts NPROC_PER_NODE ranks
#
# Knobs (environment variables; sbatch passes your environment to the job by default):
#   CONFIG        YAML config (default configs/quickstart.yaml, relative to the submit directory)
#   OUT           run directory (default runs/<config name>); a requeued job resumes from it
#   EXTRA         dotted overrides, split like a shell line: EXTRA="train.rounds=50 seed=3"
#                 (quote a value holding spaces: EXTRA="'model.options={width: 8}'")
#   PYTHON        interpreter with cafedist installed (default python3 on PATH). If it cannot
#                 import cafedist, the checkout holding this file is put on PYTHONPATH.
#   RESUME        auto (default) | none | force for the first start; a requeued job uses
#                 auto after none once this job has started the run over (a restart never
#                 starts over the run it is to continue), none again if it was stopped before
#                 (see _cafedist_started_over below), force after force (the run's config.yaml
#                 may still be the old one)
#   MAX_REQUEUES  give up requeueing after this many restarts of this job (default 20)
#   PROGRESS      1 = keep the trainer's progress line in the log (default 0)
#   OMP_NUM_THREADS  default: --cpus-per-task (else 1), so ranks do not oversubscribe cores
#   NPROC_PER_NODE, RDZV_PORT, TORCHRUN_SHUTDOWN_TIMEOUT   torchrun variant only (see below)
#
# Requeue protocol: on SIGTERM/SIGUSR1 every rank finishes its round, writes a checkpoint and
# exits with 75 (cafedist.train.signals.REQUEUE_EXIT_CODE). Then this script runs
# `scontrol requeue $SLURM_JOB_ID` if the job is still RUNNING (not being cancelled, timed out
# or requeued by Slurm itself) and MAX_REQUEUES is not reached.
# The templates ask for `--signal=B:USR1@120`: the signal reaches this batch shell, which
# forwards it to the srun step (srun hands it to every process of the step). A signal sent to
# the steps directly (`--signal=USR1@N`, `scancel --signal=USR1 JOBID`) works as well.

_CAFEDIST_SLURM_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
_CAFEDIST_REPO="$(dirname "$_CAFEDIST_SLURM_DIR")"
_CAFEDIST_REQUEUE_CODE=75

PYTHON="${PYTHON:-python3}"
CONFIG="${CONFIG:-configs/quickstart.yaml}"
_config_name="$(basename "$CONFIG")"
OUT="${OUT:-runs/${_config_name%.*}}"
EXTRA="${EXTRA:-}"
RESUME="${RESUME:-auto}"
MAX_REQUEUES="${MAX_REQUEUES:-20}"
PROGRESS="${PROGRESS:-0}"
_cafedist_user_omp="${OMP_NUM_THREADS:-}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"

_cafedist_log() { echo "cafedist-slurm: $(date '+%F %T') $*"; }

_cafedist_job_field() {  # $1: a field of `scontrol show job` (JobState, Restarts); prints its value
    scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n "s/.*[[:space:]]$1=\([^[:space:]]*\).*/\1/p" | head -n1
}

# How often Slurm has restarted THIS job. SLURM_RESTART_COUNT alone cannot tell: Slurm sets it
# only on a restart, and sbatch copies the submitting environment, so a job submitted from inside
# a restarted job inherits that job's count and its first start would pass for a restart (RESUME=
# none silently run as auto). The controller's Restarts= is the job's own; the variable is the
# fallback when scontrol cannot answer. Unset means a first start: nothing to ask.
_cafedist_restarts=0
if [[ -n "${SLURM_RESTART_COUNT:-}" ]]; then
    _cafedist_restarts="$(_cafedist_job_field Restarts)"
    [[ "$_cafedist_restarts" =~ ^[0-9]+$ ]] || _cafedist_restarts="$SLURM_RESTART_COUNT"
fi

if ! "$PYTHON" -c 'import cafedist' >/dev/null 2>&1; then
    # A source checkout (this file's parent) rather than an installed package.
    export PYTHONPATH="${_CAFEDIST_REPO}${PYTHONPATH:+:$PYTHONPATH}"
    "$PYTHON" -c 'import cafedist' >/dev/null 2>&1 || {
        _cafedist_log "error: PYTHON=$PYTHON cannot import cafedist (install it, or set PYTHON to the venv's python)"
        exit 2
    }
fi

# Whether this job has started OUT over (RESUME=none): `cafedist train --resume none` writes the
# job's token into OUT/.start-token once it has moved the earlier run aside, so a restart knows
# whether this job got that far. The token is cafedist's alone (cafedist.rundir.start_token, from
# SLURM_JOB_ID: every step of the job has it, none inherits it): Python compares
# (cafedist.rundir.started_by_this_job) and answers by its exit status alone: 3 is "no",
# anything else (a cafedist older than the token, a PYTHON that cannot run it) continues, as the
# templates always did: a restart must never start over a run it may have trained. (Output is no
# answer: a wrapper or sitecustomize may print.)
_cafedist_started_over() {
    local rc=0
    "$PYTHON" -c 'import sys; from cafedist.rundir import started_by_this_job
sys.exit(0 if started_by_this_job(sys.argv[1]) else 3)' "$OUT" >/dev/null 2>&1 || rc=$?
    [[ $rc != 3 ]]
}

_cafedist_resume=""  # the --resume of this start

# The `cafedist train` arguments, identical on every rank.
_cafedist_train_args() {
    local resume="$RESUME" extra=()
    # A restarted job continues the run it started over, never starts it over again; but one
    # stopped before it moved the earlier run aside starts over still: auto would continue the
    # earlier run, or report it finished. force stays (stopped before its first checkpoint under
    # the new config, the run's config.yaml is still the old one).
    if [[ "$_cafedist_restarts" -gt 0 && "$resume" == none ]]; then
        if _cafedist_started_over; then
            resume=auto
        else
            _cafedist_log "$OUT holds no start-over of this job's (RESUME=none; it was stopped while starting): the restart starts over"
        fi
    fi
    _cafedist_resume="$resume"
    if [[ -n "$EXTRA" ]]; then
        # xargs splits like a shell (quotes honoured) without evaluating anything.
        mapfile -t extra < <(printf '%s' "$EXTRA" | xargs -n1 printf '%s\n')
    fi
    _CAFEDIST_ARGS=(train --config "$CONFIG" --out "$OUT" --resume "$resume")
    [[ "$PROGRESS" == 1 ]] || _CAFEDIST_ARGS+=(--no-progress)
    _CAFEDIST_ARGS+=("${extra[@]}")
}

# ------------------------------------------------------------------ signals and requeue
_cafedist_signal=""
_cafedist_child=""

_cafedist_on_signal() {  # $1: signal name. Runs in the batch shell.
    _cafedist_signal="$1"
    case "$1" in
        USR1|USR2)  # preemption warning / time limit ahead: ask every rank to checkpoint
            _cafedist_log "batch script got SIG$1: forwarding SIGUSR1 to the training step"
            [[ -n "$_cafedist_child" ]] && kill -USR1 "$_cafedist_child" 2>/dev/null ;;
        TERM)  # scancel / time limit / preemption: Slurm signals the step itself
            _cafedist_log "batch script got SIGTERM: waiting for the step to checkpoint and exit" ;;
    esac
}
trap '_cafedist_on_signal USR1' USR1
trap '_cafedist_on_signal USR2' USR2
trap '_cafedist_on_signal TERM' TERM

# Decide what to do with the step's exit code; exits the batch script.
_cafedist_finish() {
    local rc=$1 state restarts="$_cafedist_restarts"
    if [[ $rc == 0 ]]; then
        _cafedist_log "training finished: $OUT/summary.json"
        exit 0
    fi
    # torchrun reports its own failure code, not the ranks' 75: a stop signal that reached this
    # script, and a run without summary.json, mean the same thing. (Under --resume none, until
    # this job has started the run over, a summary.json is the earlier run's.)
    local finished=0
    [[ -f "$OUT/summary.json" ]] && finished=1
    [[ $finished == 1 && "$_cafedist_resume" == none ]] && ! _cafedist_started_over && finished=0
    if [[ $rc != "$_CAFEDIST_REQUEUE_CODE" ]] && ! [[ -n "$_cafedist_signal" && $finished == 0 ]]; then
        _cafedist_log "training failed with exit code $rc (not requeued)"
        exit "$rc"
    fi
    # Only a RUNNING job is requeued here. scancel, `scontrol requeue`, the time limit and
    # preemption all put the job in COMPLETING before its steps even see SIGTERM: Slurm is
    # ending (or already requeueing) it, and requeueing a cancelled job would resurrect it.
    # rc 75 is cafedist's own "checkpoint written"; another code here follows a stop signal that
    # ended the step before cafedist acted on it (while starting), or is torchrun's own code after
    # its ranks checkpointed: either way the run's last checkpoint stands
    local stopped="checkpoint written"
    [[ $rc == "$_CAFEDIST_REQUEUE_CODE" ]] || stopped="stopped by a signal (exit code $rc; the run's newest checkpoint, if it has one, stands)"
    state="$(_cafedist_job_field JobState)"
    if [[ "$state" != RUNNING ]]; then
        _cafedist_log "$stopped, job is ${state:-gone} (cancelled, timed out or requeued by Slurm): not requeued here (resubmit with OUT=$OUT to continue)"
        exit "$rc"
    fi
    if [[ "$restarts" -ge "$MAX_REQUEUES" ]]; then
        _cafedist_log "$stopped, but the job was already restarted $restarts times (MAX_REQUEUES): not requeued"
        exit "$rc"
    fi
    _cafedist_log "$stopped (exit code $rc, signal ${_cafedist_signal:-none}, state ${state:-?}): scontrol requeue $SLURM_JOB_ID (restart $((restarts + 1)))"
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        _cafedist_log "scontrol requeue failed: resubmit with OUT=$OUT to continue"
    fi
    exit "$_CAFEDIST_REQUEUE_CODE"
}

# Run "$@" in the background so the traps above fire while it runs, then finish.
_cafedist_launch() {
    _cafedist_log "job ${SLURM_JOB_ID:-?} restart $_cafedist_restarts on ${SLURM_JOB_NODELIST:-?}: $*"
    "$@" &
    _cafedist_child=$!
    # `wait` returns early when a trapped signal arrives: wait again until the step is gone,
    # then once more to collect its exit status (bash remembers it).
    while kill -0 "$_cafedist_child" 2>/dev/null; do wait "$_cafedist_child"; done
    wait "$_cafedist_child"
    _cafedist_finish $?
}

# ------------------------------------------------------------------------- launchers
# One rank per task of the allocation (--ntasks / --ntasks-per-node). Extra srun options go in
# SRUN_ARGS (e.g. SRUN_ARGS="--gpu-bind=closest"). Our runtime reads SLURM_PROCID/NTASKS/LOCALID
# and uses the first node of the allocation as the rendezvous host.
cafedist_srun_train() {
    local srun_args=()
    [[ -n "${SRUN_ARGS:-}" ]] && read -r -a srun_args <<<"$SRUN_ARGS"
    _cafedist_train_args
    _cafedist_launch srun "${srun_args[@]}" "$PYTHON" -m cafedist "${_CAFEDIST_ARGS[@]}"
}

# One torchrun per node (--ntasks-per-node=1), NPROC_PER_NODE ranks each (default: GPUs on the
# node, else --cpus-per-task), c10d rendezvous on the first node at RDZV_PORT.
cafedist_torchrun_train() {
    local nproc first port torchrun threads
    nproc="${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_CPUS_PER_TASK:-1}}}"
    # --cpus-per-task is shared by the node's NPROC ranks (unless OMP_NUM_THREADS was given).
    threads="${_cafedist_user_omp:-$(( ${SLURM_CPUS_PER_TASK:-1} / nproc ))}"
    [[ "$threads" -ge 1 ]] || threads=1
    first="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
    port="${RDZV_PORT:-$((29500 + SLURM_JOB_ID % 1000))}"
    torchrun="$PYTHON -m torch.distributed.run"
    # torchrun dies on SIGUSR1 unless told to handle (and forward) it; older torch lacks the flag.
    local torchrun_help
    torchrun_help="$("$PYTHON" -m torch.distributed.run --help 2>/dev/null || true)"
    # --shutdown-timeout came to torch later than --signals-to-handle: each is probed on its own
    if grep -q -- --shutdown-timeout <<<"$torchrun_help"; then
        torchrun+=" --shutdown-timeout=${TORCHRUN_SHUTDOWN_TIMEOUT:-90}"
    fi
    if grep -q -- --signals-to-handle <<<"$torchrun_help"; then
        torchrun+=" --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
    else
        _cafedist_log "warning: this torchrun cannot handle SIGUSR1; a preemption signal ends it (the ranks still checkpoint)"
    fi
    # Ranks get their own rank from torchrun (one per node here): each node's torchrun is one
    # Slurm task, and launch/torchrun.sh turns NNODES/NPROC/RDZV_ENDPOINT into torchrun flags.
    _cafedist_train_args
    _cafedist_launch srun --ntasks-per-node=1 env \
        NNODES="${SLURM_JOB_NUM_NODES:-1}" NPROC="$nproc" RDZV_ENDPOINT="$first:$port" \
        RDZV_ID="${SLURM_JOB_ID}" PYTHON="$PYTHON" TORCHRUN="$torchrun" \
        OMP_NUM_THREADS="$threads" \
        bash "$_CAFEDIST_REPO/launch/torchrun.sh" "${_CAFEDIST_ARGS[@]}"
}
