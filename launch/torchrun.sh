#!/usr/bin/env bash
# Launch `python -m cafedist ARGS...` with torchrun (one process per CPU slot or GPU).
#
#   launch/torchrun.sh train --config configs/x.yaml          # one node, NPROC processes
#   NNODES=2 RDZV_ENDPOINT=node01:29500 launch/torchrun.sh train ...   # run on every node
#
# Knobs (environment variables):
#   NPROC          processes per node (default 2)
#   NNODES         number of nodes (default 1: single node, `--standalone` rendezvous)
#   RDZV_ENDPOINT  host:port reachable from every node (required when NNODES > 1), usually the
#                  first node of the allocation and a free port
#   NODE_RANK      optional, multi-node only: if set, use a static rendezvous (this node's
#                  index 0..NNODES-1, node 0 hosts RDZV_ENDPOINT); if unset, nodes join a
#                  dynamic c10d rendezvous and get their index from it
#   RDZV_ID        rendezvous id shared by the nodes of one job (default: $SLURM_JOB_ID or
#                  "cafedist")
#   PYTHON         interpreter that runs cafedist (default: python3 on PATH)
#   TORCHRUN       torchrun command (default: `torchrun` next to $PYTHON, else on PATH, else
#                  `$PYTHON -m torch.distributed.run`, told to forward SIGUSR1 as well as SIGTERM
#                  to the ranks, which then checkpoint and exit 75 for requeue)
#   TORCHRUN_SHUTDOWN_TIMEOUT  seconds torchrun gives the ranks to checkpoint before it kills
#                  them (default 90; a hung peer also ends the job only that long after
#                  dist.timeout_s)
#   DRY_RUN=1      print the command instead of running it
set -euo pipefail

NPROC="${NPROC:-2}"
NNODES="${NNODES:-1}"

PYTHON="${PYTHON:-python3}"

# Prefer the torchrun installed with the interpreter (a venv), so both use the same torch.
pydir="$(dirname "$(command -v "${PYTHON}" || echo "${PYTHON}")")"
if [[ -n "${TORCHRUN:-}" ]]; then
    read -r -a runner <<<"${TORCHRUN}"
elif [[ -x "${pydir}/torchrun" ]]; then
    runner=("${pydir}/torchrun")
elif command -v torchrun >/dev/null 2>&1; then
    runner=(torchrun)
else
    runner=("${PYTHON}" -m torch.distributed.run)
fi
# torchrun dies at once on SIGUSR1 (a preemption signal) unless told to handle and forward it;
# older torch lacks the flag. A TORCHRUN of the caller's (slurm/_run.sh) carries its own flags.
# Each flag is probed on its own: --shutdown-timeout came to torch later than the other.
if [[ -z "${TORCHRUN:-}" ]]; then
    torchrun_help="$("${runner[@]}" --help 2>/dev/null || true)"
    if grep -q -- --signals-to-handle <<<"${torchrun_help}"; then
        runner+=(--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1)
    fi
    if grep -q -- --shutdown-timeout <<<"${torchrun_help}"; then
        runner+=(--shutdown-timeout="${TORCHRUN_SHUTDOWN_TIMEOUT:-90}")
    fi
fi

if [[ "${NNODES}" == "1" ]]; then
    rdzv=(--standalone)
else
    if [[ -z "${RDZV_ENDPOINT:-}" ]]; then
        echo "launch/torchrun.sh: error: NNODES=${NNODES} needs RDZV_ENDPOINT=host:port (e.g. the first node and a free port)" >&2
        exit 2
    fi
    if [[ -n "${NODE_RANK:-}" ]]; then
        rdzv=(--nnodes="${NNODES}" --node_rank="${NODE_RANK}"
              --master_addr="${RDZV_ENDPOINT%:*}" --master_port="${RDZV_ENDPOINT##*:}")
    else
        rdzv=(--nnodes="${NNODES}" --rdzv_backend=c10d --rdzv_endpoint="${RDZV_ENDPOINT}"
              --rdzv_id="${RDZV_ID:-${SLURM_JOB_ID:-cafedist}}")
    fi
fi

cmd=("${runner[@]}" "${rdzv[@]}" --nproc_per_node="${NPROC}" -m cafedist "$@")
if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "${cmd[@]}"; echo
    exit 0
fi
exec "${cmd[@]}"
