#!/usr/bin/env bash
# Tear down what .ci/slurm-up.sh started: cancel jobs, stop slurmd, slurmctld, slurmdbd,
# MariaDB and munged by their pid files (never by process name). Idempotent.
#
#   bash .ci/slurm-down.sh          # stop the daemons, keep the state directory (job ids go on)
#   bash .ci/slurm-down.sh --wipe   # also delete the state directory and the accounting DB:
#                                   # job ids restart at 1 on the next slurm-up.sh
#
# Knob: SLURM_STATE_DIR (default /tmp/cafedist-slurm), as for slurm-up.sh.
set -uo pipefail

S="${SLURM_STATE_DIR:-/tmp/cafedist-slurm}"
WIPE=0
[[ "${1:-}" == "--wipe" ]] && WIPE=1

log() { echo "slurm-down: $*"; }

stop() {  # stop PIDFILE NAME: SIGTERM, wait up to 10 s, then SIGKILL
    local f=$1 pid
    [[ -f "$f" ]] || return 0
    pid=$(cat "$f")
    kill -TERM "$pid" 2>/dev/null || { rm -f "$f"; return 0; }
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || { log "stopped $2"; return 0; }
        sleep 0.2
    done
    log "$2 ($pid) did not stop in 10 s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null
    rm -f "$f"
}

if [[ -f "$S/slurmctld.pid" ]] && kill -0 "$(cat "$S/slurmctld.pid")" 2>/dev/null; then
    # Cancel every job first, so slurmd does not leave job steps (our trainers) behind.
    scancel --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 1 30); do
        [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break
        sleep 0.5
    done
fi

stop "$S/slurmd.pid" slurmd
stop "$S/slurmctld.pid" slurmctld
stop "$S/slurmdbd.pid" slurmdbd
if [[ -f /etc/slurm/slurmdbd.conf ]] && mysqladmin ping >/dev/null 2>&1; then
    # Job ids restart at 1 after a wipe: drop the accounting DB too, or sacct mixes old and new.
    [[ $WIPE == 1 ]] && mysql -e 'DROP DATABASE IF EXISTS slurm_acct_db'
    mysqladmin shutdown && log "stopped MariaDB"
fi
stop /run/munge/munged.pid munged

if [[ $WIPE == 1 ]]; then
    rm -rf "$S"
    log "wiped $S"
fi
log "down"
