#!/usr/bin/env bash
# A one-node SLURM on this machine from Debian's packages (slurmctld, slurmd, slurm-client, munge), for running the
# project's sweeps as a lab does (python train_cls.py -m launcher=slurm_cpu ...) and for the tests.
#
#   bash scripts/slurm_local.sh start    # install if missing, write the config, start munge, slurmctld, slurmd
#   bash scripts/slurm_local.sh status   # sinfo and squeue
#   bash scripts/slurm_local.sh stop     # stop the daemons this script started
#
# The node offers this machine's cores and memory; no accounting database (sacct answers nothing), so submitit
# learns that a job ended from its result file. Needs root (apt-get, the daemons). Writes only /etc/slurm/slurm.conf,
# /etc/munge/munge.key (when missing) and state under /var/lib/slurm-local.
set -euo pipefail

STATE=/var/lib/slurm-local
CONF=/etc/slurm/slurm.conf
PACKAGES=(slurmctld slurmd slurm-client munge)

die() { echo "error: $*" >&2; exit 1; }
running() { for d in slurmd slurmctld munged; do pgrep -x "$d" >/dev/null && return 0; done; return 1; }

install_packages() {
  local missing=()
  for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "SLURM is not installed: run as root, or apt-get install ${missing[*]}"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null 2>&1; then
    apt-get update -q >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null \
      || die "apt-get install ${missing[*]} failed: this machine cannot install Debian's SLURM packages"
  fi
}

write_config() {
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 ))
  mkdir -p "$STATE/ctld" "$STATE/d" /etc/slurm /run/munge /var/log/slurm-local
  cat > "$CONF" <<EOF
# written by scripts/slurm_local.sh: one node, this machine
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=/var/log/slurm-local/slurmctld.log
SlurmdLogFile=/var/log/slurm-local/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
KillWait=10
EOF
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    (command -v mungekey >/dev/null && mungekey --create --force) \
      || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null
  fi
  chown munge:munge /etc/munge/munge.key /run/munge 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
  pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
}

wait_idle() {
  local host; host=$(hostname -s)
  for _ in $(seq 1 60); do
    if sinfo -h -n "$host" -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then return 0; fi
    scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  die "the node did not come up within 60 s; see /var/log/slurm-local/*.log"
}

case "${1:-}" in
  start)
    install_packages
    write_config
    start_munge
    pgrep -x slurmctld >/dev/null || slurmctld
    pgrep -x slurmd >/dev/null || slurmd
    wait_idle
    echo "slurm: one node ($(nproc) CPUs), partition 'local' is up"
    ;;
  stop)
    scancel --user=root >/dev/null 2>&1 || true
    for d in slurmd slurmctld munged; do pkill -x "$d" 2>/dev/null || true; done
    for _ in $(seq 1 20); do running || break; sleep 0.5; done
    running && die "SLURM daemons still running after 10 s"
    echo "slurm: stopped"
    ;;
  status)
    sinfo; squeue
    ;;
  *)
    echo "usage: bash scripts/slurm_local.sh start|stop|status" >&2; exit 2
    ;;
esac
