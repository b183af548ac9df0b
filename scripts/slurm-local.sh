#!/usr/bin/env bash
# A real one-node SLURM cluster on 127.0.0.1 for tests: munge, MariaDB + slurmdbd (so that
# `sacct` works: the Snakemake SLURM plugin polls it), slurmctld, slurmd, and two fake GPUs
# declared as GRES, so `gpu: 1` jobs are scheduled on a machine without one.
#
#   scripts/slurm-local.sh up      install (Debian packages, root) and start; idempotent
#   scripts/slurm-local.sh install only the Debian packages (needs the network; `up` does it too)
#   scripts/slurm-local.sh down    stop only the daemons this script started
#   scripts/slurm-local.sh status  sinfo
#
# No systemd is assumed: every daemon is started by hand and its pid recorded under $STATE.
set -euo pipefail

STATE=/var/lib/slurm-local
CONF=/etc/slurm
NODE=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 95 / 100 ))

CHANGED=0

log() { echo "slurm-local: $*" >&2; }

# md5 of the files that exist among "$@" (none yet on a fresh machine: a plain
# `cat missing | md5sum` fails the pipe under pipefail and ends the script).
digest() {
    local f
    for f in "$@"; do
        if [[ -f $f ]]; then cat "$f"; fi
    done | md5sum
}

install_packages() {
    local missing=()
    for pkg in munge slurmctld slurmd slurm-client slurmdbd mariadb-server; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

write_config() {
    mkdir -p "$CONF" "$STATE/fakegpu" /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm /run/slurm
    chown -R slurm:slurm /var/lib/slurm /var/log/slurm /run/slurm
    # Fake GPUs: character devices with no driver behind them (a gres File= must be a device).
    for i in 0 1; do
        [[ -e $STATE/fakegpu/gpu$i ]] || mknod "$STATE/fakegpu/gpu$i" c 195 "$i"
    done
    local before
    before=$(digest "$CONF/slurm.conf" "$CONF/gres.conf")
    cat > "$CONF/slurm.conf" <<EOF
# Written by scripts/slurm-local.sh: a one-node test cluster.
ClusterName=local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=slurm
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
MinJobAge=3600
ReturnToService=2
SchedulerParameters=batch_sched_delay=0
GresTypes=gpu
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=5
# sacct shows the plugin's --comment (rule_<name>_wildcards_<...>): tests map jobs to rules by it.
AccountingStoreFlags=job_comment
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:fake:2 State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE MaxTime=INFINITE State=UP
EOF
    echo "NodeName=$NODE Name=gpu Type=fake File=$STATE/fakegpu/gpu[0-1]" > "$CONF/gres.conf"
    [[ $before == "$(digest "$CONF/slurm.conf" "$CONF/gres.conf")" ]] || CHANGED=1
    cat > "$CONF/slurmdbd.conf" <<EOF
DbdHost=localhost
SlurmUser=slurm
PidFile=/run/slurm/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    chown slurm:slurm "$CONF/slurmdbd.conf"
    chmod 600 "$CONF/slurmdbd.conf"
}

running() { [[ -f $STATE/$1.pid ]] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }

start() {  # start NAME PIDFILE CMD...: run a daemon unless it is up, remember its pid
    local name=$1 pidfile=$2
    shift 2
    if running "$name"; then return; fi
    "$@"
    for _ in $(seq 50); do
        [[ -s $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null && break
        sleep 0.2
    done
    [[ -s $pidfile ]] || { log "$name did not start"; exit 1; }
    cp "$pidfile" "$STATE/$name.pid"
}

up() {
    install_packages
    write_config
    mkdir -p /run/munge /run/mysqld
    chown munge:munge /run/munge
    chown mysql:mysql /run/mysqld
    # Debian's postinst creates the data directory; a container image may have lost it.
    if [[ ! -d /var/lib/mysql/mysql ]]; then
        log "initialising the MariaDB data directory"
        mkdir -p /var/lib/mysql && chown mysql:mysql /var/lib/mysql
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql --skip-test-db >"$STATE/mariadb-install.log" 2>&1
    fi
    touch "$STATE/mariadb.log" && chown mysql:mysql "$STATE/mariadb.log"  # mariadbd writes it as mysql
    start munged /run/munge/munged.pid runuser -u munge -- munged
    start mariadbd /run/mysqld/mysqld.pid setsid -f mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid \
        --socket=/run/mysqld/mysqld.sock --skip-networking=0 --bind-address=127.0.0.1 --log-error=$STATE/mariadb.log
    for _ in $(seq 50); do mariadb -e "select 1" >/dev/null 2>&1 && break; sleep 0.2; done
    mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
                GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
    start slurmdbd /run/slurm/slurmdbd.pid slurmdbd
    # (each try bounded: sacctmgr blocks for minutes when slurmdbd died at start)
    for _ in $(seq 50); do timeout 5 sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.2; done
    timeout 5 sacctmgr -n list cluster >/dev/null 2>&1 ||
        { log "slurmdbd does not answer: $(tail -n 3 /var/log/slurm/slurmdbd.log 2>/dev/null)"; exit 1; }
    sacctmgr -i -Q add cluster local >/dev/null 2>&1 || true
    sacctmgr -i -Q add account localacct cluster=local >/dev/null 2>&1 || true
    sacctmgr -i -Q add user "$(id -un)" account=localacct cluster=local >/dev/null 2>&1 || true
    start slurmctld /run/slurm/slurmctld.pid slurmctld
    start slurmd /run/slurm/slurmd.pid slurmd
    if ((CHANGED)); then scontrol reconfigure; fi
    # State survives restarts: a node drained by an earlier configuration stays drained.
    for _ in $(seq 50); do [[ -n $(sinfo -h -o %T 2>/dev/null) ]] && break; sleep 0.2; done
    scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
    for _ in $(seq 100); do
        # (no `grep -q` in a pipe: under pipefail the early exit fails the pipe)
        if [[ $(sinfo -h -o %T) =~ ^(idle|mixed|allocated) ]]; then
            log "up: $(sinfo -h -o '%P %T %G' | tr '\n' ' ')"
            return
        fi
        sleep 0.2
    done
    log "node not ready: $(sinfo -h -o '%T %E')"
    exit 1
}

down() {
    for name in slurmd slurmctld slurmdbd mariadbd munged; do
        if running "$name"; then
            kill "$(cat "$STATE/$name.pid")" && log "stopped $name"
        fi
        rm -f "$STATE/$name.pid"
    done
}

case ${1:-up} in
    up) up ;;
    install) install_packages ;;
    down) down ;;
    status) sinfo ;;
    *) echo "usage: $0 up|install|down|status" >&2; exit 2 ;;
esac
