#!/usr/bin/env bash
# Stand up a single-node Slurm (Debian 12 `slurm-wlm` 22.05 + `munge`) on this machine, as root,
# without systemd or cgroups. Idempotent: re-running it with a cluster already up only re-checks
# it (and reconfigures slurmctld if this script's slurm.conf changed).
#
#   bash .ci/slurm-up.sh                       # partition "debug", 4 CPUs, no accounting
#   SLURM_ACCT=1 bash .ci/slurm-up.sh          # + MariaDB and slurmdbd, so `sacct` works
#
# Knobs (environment variables):
#   SLURM_LOCAL_CPUS  CPUs the node advertises (default 4; may exceed `nproc` thanks to
#                     SlurmdParameters=config_overrides, so 2-core CI machines can run 4 tasks)
#   SLURM_ACCT        1 = also start MariaDB + slurmdbd (sacct, job states after the end).
#                     Default 0: the tests and `cafedist submit` do not need sacct (submitit then
#                     logs "Bypassing sacct error" and reads job states from its result files).
#   SLURM_STATE_DIR   state, spool, pid and log files (default /tmp/cafedist-slurm)
#
# Tear down with .ci/slurm-down.sh (it reads the same SLURM_STATE_DIR).
set -euo pipefail

S="${SLURM_STATE_DIR:-/tmp/cafedist-slurm}"
CPUS="${SLURM_LOCAL_CPUS:-4}"
ACCT="${SLURM_ACCT:-0}"
CONF=/etc/slurm/slurm.conf

log() { echo "slurm-up: $*"; }

if [[ $(id -u) != 0 ]]; then
    log "error: must run as root (it installs packages and starts munged/slurmctld/slurmd)" >&2
    exit 2
fi

apt_install() {  # apt_install PKG...: install only what is missing, quietly
    local missing=()
    for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

apt_install slurm-wlm munge
[[ "$ACCT" == 1 ]] && apt_install slurmdbd mariadb-server

mkdir -p "$S/state" "$S/spool" /run/munge /etc/slurm
chown munge:munge /run/munge && chmod 755 /run/munge
[[ -s /etc/munge/munge.key ]] || { mungekey --create >/dev/null 2>&1 || /usr/sbin/create-munge-key -f; }

if [[ "$ACCT" == 1 ]]; then
    accounting="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost"
else
    accounting="AccountingStorageType=accounting_storage/none"
fi

# Why these settings:
#  - SlurmUser=root, ProctrackType=linuxproc, TaskPlugin=none: no systemd/cgroup v2 delegation
#    in containers; linuxproc tracks processes by parent pid instead.
#  - SlurmdParameters=config_overrides: trust CPUs= below instead of the detected hardware.
#  - AuthInfo=cred_expire=10: a requeued job may start again only after the credential
#    lifetime (default 120 s); 10 s keeps the requeue tests short.
#  - SchedulerParameters=bf_interval=2,sched_interval=2: a requeued job becomes eligible at
#    requeue + cred_expire + 1 s, but nothing starts it before the next periodic scheduler
#    pass (sched_interval, default 60 s). Measured requeue -> running again: 16-46 s with the
#    defaults, 11 s with these.
#  - KillWait=10: seconds between SIGTERM and SIGKILL at cancel/time limit/requeue.
#  - OverSubscribe=YES: several small test jobs may share the 4 CPUs.
new_conf=$(cat <<EOF
# written by cafedist .ci/slurm-up.sh
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
$accounting
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=10
MailProg=/bin/true
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool
SlurmctldPidFile=$S/slurmctld.pid
SlurmdPidFile=$S/slurmd.pid
SlurmctldLogFile=$S/slurmctld.log
SlurmdLogFile=$S/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
)
conf_changed=0
if [[ ! -f "$CONF" ]] || [[ "$(cat "$CONF")" != "$new_conf" ]]; then
    printf '%s\n' "$new_conf" > "$CONF"
    conf_changed=1
fi

running() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }  # running PIDFILE

running /run/munge/munged.pid || { log "starting munged"; runuser -u munge -- /usr/sbin/munged; }

if [[ "$ACCT" == 1 ]]; then
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    if ! mysqladmin ping >/dev/null 2>&1; then
        log "starting MariaDB"
        (setsid mariadbd-safe >"$S/mariadb.log" 2>&1 &)
        for _ in $(seq 1 60); do mysqladmin ping >/dev/null 2>&1 && break; sleep 0.5; done
    fi
    mysql -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
    cat > /etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
PidFile=$S/slurmdbd.pid
LogFile=$S/slurmdbd.log
EOF
    chmod 600 /etc/slurm/slurmdbd.conf
    running "$S/slurmdbd.pid" || { log "starting slurmdbd"; slurmdbd; }
    for _ in $(seq 1 60); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.5; done
    sacctmgr -n list cluster format=cluster | grep -qw local || sacctmgr -i add cluster local >/dev/null
fi

if running "$S/slurmctld.pid"; then
    [[ $conf_changed == 1 ]] && { log "slurm.conf changed: scontrol reconfigure"; scontrol reconfigure; }
else
    log "starting slurmctld"
    slurmctld -i   # -i: ignore job/state files that do not match this config
fi
running "$S/slurmd.pid" || { log "starting slurmd"; slurmd -N localhost; }

# Wait until the node accepts work (idle, mixed or allocated all mean "up").
for _ in $(seq 1 120); do
    state=$(sinfo -h -N -o %T 2>/dev/null | head -n1 || true)
    case "$state" in idle|mixed|allocated|completing) break ;; esac
    sleep 0.5
done
case "${state:-}" in
    idle|mixed|allocated|completing) ;;
    *) log "error: node state is '${state:-unknown}' after 60 s; see $S/slurmctld.log and $S/slurmd.log" >&2
       exit 1 ;;
esac
sinfo
log "up (state dir $S, CPUs=$CPUS, accounting=$([[ $ACCT == 1 ]] && echo slurmdbd || echo none))"
