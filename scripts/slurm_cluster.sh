#!/usr/bin/env bash
# A private SLURM cluster (Debian 12, Slurm 22.05) for tests, run as root: one node, or several inside this machine.
#   scripts/slurm_cluster.sh install            apt-get the packages (no-op when already installed)
#   scripts/slurm_cluster.sh start DIR [NODES]  munged + MariaDB + slurmdbd + slurmctld + one slurmd per node, all
#                                               state under DIR
#   scripts/slurm_cluster.sh stop DIR           stop every daemon and node that `start DIR` began
#   scripts/slurm_cluster.sh node-kill DIR NAME  (NODES>=2) SIGKILL everything in node NAME: its slurmd, job steps,
#                                               job processes — the node is lost, as if it lost power
#   scripts/slurm_cluster.sh node-start DIR NAME start NAME's slurmd again and wait until the node is back in service
# Clients: `. DIR/env.sh` (sets SLURM_CONF), then sbatch/squeue/sacct as usual.
# Every port is picked free at start and every socket/pid/log/state path lives under DIR (munge's in a /tmp dir
# linked from DIR/munge/dir), so two clusters (or a system-wide Slurm/MariaDB/munge) can run side by side.
#
# NODES=1 (default): the node is this machine (its host name, 127.0.0.1). NODES>=2: node i is `n<i>`, a network
# namespace with its own address on a private bridge (10.A.B.1 is the controller, 10.A.B.1<i> node i; the subnet is
# one this machine does not use), its own host name (UTS namespace) and an /etc/hosts that names every node (bind-
# mounted in its own mount namespace), running its own slurmd. Each node has its own share of this machine's cores
# (its slurmd, and so every job step and Ray worker in it, runs under `taskset`; DIR/cores.txt lists "name cores"),
# as separate machines would: two vLLM engines on two nodes then do not bind their threads to the same cores. Memory
# is not split, and the file system is shared, as on a cluster with a shared home. Nodes talk to each other and to
# slurmctld over the bridge only; DIR/nodes.txt lists "name address netns" per node.
set -euo pipefail
# Daemons and admin tools live in /usr/sbin, which a non-login shell's PATH may lack.
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}"

CLUSTER=selfplay
DAEMONS=(slurmctld slurmd munged slurmdbd)

# Commands run when this script exits, however it exits.
AT_EXIT=()
at_exit() { local c; for c in "${AT_EXIT[@]}"; do eval "$c"; done; }
trap at_exit EXIT

log() { echo "[slurm_cluster] $*" >&2; }
die() { log "error: $*"; exit 1; }

installed() {
  local d
  for d in "${DAEMONS[@]}"; do command -v "$d" >/dev/null || return 1; done
  command -v mariadbd >/dev/null || command -v mysqld >/dev/null
}

cmd_install() {
  if installed; then log "already installed"; return 0; fi
  [ "$(id -u)" = 0 ] || die "install needs root"
  local t0=$SECONDS pkgs=(slurm-wlm slurmdbd munge mariadb-server)
  # Keep the package scripts from starting system-wide munge/MariaDB/Slurm (default ports and sockets): only our
  # private daemons should run. 101 = "action forbidden" for invoke-rc.d and deb-systemd-invoke.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    AT_EXIT+=("rm -f /usr/sbin/policy-rc.d")
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
  fi
  # The package index is refreshed only when apt does not know the packages yet (a fresh machine has no lists) or
  # when installing from it fails (stale lists name versions the mirror no longer has).
  # DPkg::Lock::Timeout: a freshly booted VM may be running unattended-upgrades.
  local apt=(apt-get -q -o DPkg::Lock::Timeout=300)
  if ! apt-cache show "${pkgs[@]}" >/dev/null 2>&1; then "${apt[@]}" update; fi
  if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y --no-install-recommends "${pkgs[@]}"; then
    log "apt-get install failed: refreshing the package index and retrying"
    "${apt[@]}" update
    DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y --no-install-recommends "${pkgs[@]}"
  fi
  installed || die "packages installed but a daemon is missing"
  log "installed in $((SECONDS - t0)) s"
}

# A TCP port nobody uses now (below the kernel's ephemeral range so outgoing connections cannot take it later).
# /proc/net/tcp{,6} list every socket's local port in hex (field 2, "ADDR:PORT"); python may not be installed.
# Sets the variable named $1 (not echoed: a $(...) subshell would lose USED_PORTS, which keeps picks distinct).
USED_PORTS=" "
free_port() {
  local used="" f p _ local_addr
  for f in /proc/net/tcp /proc/net/tcp6; do
    [ -r "$f" ] || continue
    while read -r _ local_addr _; do used+=" $((16#${local_addr##*:}))"; done < <(tail -n +2 "$f")
  done
  for _ in $(seq 200); do
    p=$((20000 + RANDOM % 12000))
    case "$used $USED_PORTS " in *" $p "*) continue ;; esac
    USED_PORTS+="$p "
    printf -v "$1" %s "$p"
    return 0
  done
  die "no free port found"
}

# Wait up to $1 seconds for the command in "$@" to succeed.
wait_for() {
  local secs=$1; shift
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || return 1
    sleep 0.2
  done
}

nodes_idle() { [ "$(sinfo -h -N -o %t 2>/dev/null | sort -u)" = idle ]; }
no_jobs() { [ -z "$(squeue -h -t R,CG,S 2>/dev/null)" ]; }

# A 10.A.B.0/24 subnet that no interface of this machine is in (sets the variable named $1 to "10.A.B").
free_subnet() {
  local used candidate _
  used=$(ip -4 -o addr show | awk '{print $4}')
  for _ in $(seq 200); do
    candidate="10.$((64 + RANDOM % 128)).$((RANDOM % 256))"
    grep -q "^$candidate\." <<<"$used" && continue
    printf -v "$1" %s "$candidate"
    return 0
  done
  die "no free 10.x.y.0/24 subnet found"
}

# Nodes 1..$2 of cluster DIR=$1: the bridge (controller side), then per node a netns joined by a veth pair, and the
# hosts file every node sees. Names carry a per-cluster id so that two clusters never share a bridge or namespace.
start_network() {
  local dir=$1 nodes=$2 id net i ns
  id=$(head -c 3 /dev/urandom | od -An -tx1 | tr -d ' \n')
  free_subnet net
  echo "$id $net" >"$dir/network"
  ip link add "spb$id" type bridge
  ip addr add "$net.1/24" dev "spb$id"
  ip link set "spb$id" up
  printf '127.0.0.1 localhost\n%s.1 %s\n' "$net" "$(hostname -s)" >"$dir/hosts"
  : >"$dir/nodes.txt"
  : >"$dir/cores.txt"
  local cores per
  read -r -a cores <<<"$(machine_cores)"
  per=$(( ${#cores[@]} / nodes ))
  for i in $(seq "$nodes"); do
    if (( per >= 1 )); then  # node i: the i-th block of cores; fewer cores than nodes: every node gets them all
      echo "n$i $(IFS=,; echo "${cores[*]:$(( (i - 1) * per )):$per}")" >>"$dir/cores.txt"
    else
      echo "n$i $(IFS=,; echo "${cores[*]}")" >>"$dir/cores.txt"
    fi
    ns="sp${id}n$i"
    ip netns add "$ns"
    ip link add "sp${id}v$i" type veth peer name eth0 netns "$ns"
    ip link set "sp${id}v$i" master "spb$id" up
    ip -n "$ns" addr add "$net.1$i/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    ip -n "$ns" route add default via "$net.1"
    printf '%s.1%s n%s\n' "$net" "$i" "$i" >>"$dir/hosts"
    echo "n$i $net.1$i $ns" >>"$dir/nodes.txt"
  done
}

# The cores this process may run on, space-separated (its affinity, as taskset reports it).
machine_cores() {
  python3 -c 'import os; print(*sorted(os.sched_getaffinity(0)))'
}

# The comma-separated cores of node $2 in cluster DIR=$1.
node_cores() {
  awk -v n="$2" '$1 == n {print $2}' "$1/cores.txt"
}

# slurmd of node $2 (its netns $3) under cluster DIR=$1, on the node's cores: entered with nsenter, not `ip netns
# exec`, which remounts /sys and leaves slurmd without the cgroup file system it probes at start.
start_node_slurmd() {
  local dir=$1 name=$2 ns=$3
  mkdir -p "$dir/spool/$name"
  taskset -c "$(node_cores "$dir" "$name")" nsenter --net="/run/netns/$ns" unshare --uts --mount sh -c \
    "hostname $name && mount --bind '$dir/hosts' /etc/hosts && exec slurmd -N $name"
}

cmd_start() {
  local dir=${1:?usage: start DIR [NODES]} nodes=${2:-1}
  [ "$(id -u)" = 0 ] || die "start needs root"
  installed || die "not installed: run '$0 install'"
  [[ "$nodes" =~ ^[1-9][0-9]?$ ]] || die "NODES must be 1..99, not '$nodes'"
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  [ ! -e "$dir/slurm.conf" ] || die "$dir already holds a cluster (stop it and use a fresh DIR)"
  local t0=$SECONDS host mem_mb cpus db_port dbd_port ctld_port slurmd_port ctld_addr node_lines node_names
  mkdir -p "$dir"/{munge,db,state,spool,log,run}
  host=$(hostname -s)
  cpus=$(nproc)
  # RealMemory above what slurmd detects would drain the node: stay ~5% (at least 256 MB) below MemTotal.
  mem_mb=$(awk '/^MemTotal:/ { m = int($2 / 1024); r = int(m * 0.05); if (r < 256) r = 256; print m - r }' /proc/meminfo)
  free_port db_port; free_port dbd_port; free_port ctld_port; free_port slurmd_port
  if [ "$nodes" = 1 ]; then
    ctld_addr=127.0.0.1
    node_names=$host
    node_lines="NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
  else
    command -v ip >/dev/null && command -v nsenter >/dev/null && command -v unshare >/dev/null && command -v taskset >/dev/null \
      || die "a multi-node cluster needs ip (iproute2), nsenter, unshare and taskset (util-linux)"
    start_network "$dir" "$nodes"
    ctld_addr="$(awk '{print $2}' "$dir/network").1"
    node_names=$(awk '{print $1}' "$dir/nodes.txt" | paste -sd, -)
    cpus=$(node_cores "$dir" n1 | tr ',' '\n' | wc -l)  # every node has the same number of cores
    node_lines=$(awk -v c="$cpus" -v m="$mem_mb" \
      '{print "NodeName=" $1 " NodeAddr=" $2 " CPUs=" c " RealMemory=" m " State=UNKNOWN"}' "$dir/nodes.txt")
  fi

  # munge: a private key and socket, munged running as the munge user as packaged. munged insists that every
  # directory above its socket be searchable by all users, which DIR's parents may not be (pytest's tmp dirs are
  # 0700), so its key, socket, pid and log live in a /tmp directory of their own, linked from DIR/munge/dir.
  local mdir
  mdir=$(mktemp -d /tmp/slurm-munge.XXXXXX)
  ln -s "$mdir" "$dir/munge/dir"
  chown munge:munge "$mdir" && chmod 755 "$mdir"  # munged wants its socket dir searchable by all
  dd if=/dev/urandom bs=1 count=1024 of="$mdir/munge.key" status=none
  chown munge:munge "$mdir/munge.key" && chmod 400 "$mdir/munge.key"
  runuser -u munge -- munged --key-file="$mdir/munge.key" --socket="$mdir/munge.socket" \
    --pid-file="$mdir/munged.pid" --log-file="$mdir/munged.log" --seed-file="$mdir/munged.seed"
  wait_for 10 test -S "$mdir/munge.socket" || die "munged did not start: $(cat "$mdir/munged.log" 2>/dev/null)"
  # cred_expire: a requeued job waits this long before it may start again (default 120 s; the pre-emption tests
  # requeue jobs).
  local auth="AuthType=auth/munge
AuthInfo=socket=$mdir/munge.socket,cred_expire=20"

  # MariaDB for slurmdbd: private datadir/socket, TCP on a free loopback port (slurmdbd connects over TCP).
  local sock="$dir/run/mysqld.sock" mysqld
  mysqld=$(command -v mariadbd || command -v mysqld)
  cat >"$dir/my.cnf" <<EOF
[mysqld]
datadir=$dir/db
socket=$sock
pid-file=$dir/run/mysqld.pid
log-error=$dir/log/mysqld.log
port=$db_port
bind-address=127.0.0.1
skip-name-resolve
# A throwaway test database: small and fast rather than durable.
innodb_buffer_pool_size=128M
innodb_log_file_size=64M
innodb_flush_log_at_trx_commit=0
innodb_lock_wait_timeout=900
[client]
socket=$sock
EOF
  mariadb-install-db --defaults-file="$dir/my.cnf" --user=root --skip-test-db >"$dir/log/mysql-install.log" 2>&1 \
    || die "mariadb-install-db failed: $(tail -5 "$dir/log/mysql-install.log")"
  # mariadbd does not daemonize: detach it (own session, no inherited stdio) so the caller does not wait on it.
  setsid "$mysqld" --defaults-file="$dir/my.cnf" --user=root </dev/null >>"$dir/log/mysqld.log" 2>&1 &
  wait_for 60 mariadb-admin --defaults-file="$dir/my.cnf" -uroot ping \
    || die "MariaDB did not start: $(tail -5 "$dir/log/mysqld.log")"
  local dbpass
  dbpass=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
  # root@localhost authenticates by unix socket, which matches us (root).
  mariadb --defaults-file="$dir/my.cnf" -uroot <<EOF
CREATE DATABASE slurm_acct_db;
CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$dbpass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF

  # slurmdbd reads slurmdbd.conf from the directory of $SLURM_CONF; it must be mode 600 and owned by SlurmUser.
  export SLURM_CONF="$dir/slurm.conf"
  (umask 077; cat >"$dir/slurmdbd.conf" <<EOF
$auth
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$dbd_port
SlurmUser=root
PidFile=$dir/run/slurmdbd.pid
LogFile=$dir/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=slurm
StoragePass=$dbpass
StorageLoc=slurm_acct_db
EOF
  )
  cat >"$dir/slurm.conf" <<EOF
ClusterName=$CLUSTER
# Addresses given explicitly: the host name need not resolve (fresh CI machines).
SlurmctldHost=$host($ctld_addr)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
$auth
StateSaveLocation=$dir/state
# %n: each node's slurmd keeps its own spool, pid file and log.
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: works in containers and VMs without a delegated cgroup tree.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default a job without --mem takes the whole node's memory, and jobs would run one at a time.
DefMemPerCPU=$((mem_mb / cpus))
# Accounting through slurmdbd (sacct), plus a plain-text record of every finished job as a fallback.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$dbd_port
# Connections to slurmdbd authenticate with this munge socket, not AuthInfo's.
AccountingStoragePass=socket=$mdir/munge.socket
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.txt
# Tests wait on dependency chains. Measured end-of-job to afterok-dependent start: ~3 s with the defaults, ~1 s
# with batch_sched_delay=0 (batch jobs start on the next main pass), 0.4-0.6 s adding bf_interval=1 (backfill
# pass every second instead of every 30 s).
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,bf_interval=1
MaxArraySize=1001
KillWait=5
ReturnToService=2
# Finished jobs stay visible to squeue/scontrol for 5 minutes.
MinJobAge=300
# A lost node (tests/test_slurm_multinode.py) is declared DOWN this many seconds after its slurmd stops answering.
SlurmdTimeout=30
InactiveLimit=0
MpiDefault=none
MailProg=/bin/true
$node_lines
PartitionName=debug Nodes=$node_names Default=YES MaxTime=INFINITE State=UP
EOF

  slurmdbd || die "slurmdbd failed: $(tail -5 "$dir/log/slurmdbd.log")"
  wait_for 60 sacctmgr -n list cluster || die "slurmdbd does not answer: $(tail -5 "$dir/log/slurmdbd.log")"
  # slurmctld registers with slurmdbd only as a known cluster.
  sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
  slurmctld || die "slurmctld failed: $(tail -5 "$dir/log/slurmctld.log")"
  if [ "$nodes" = 1 ]; then
    mkdir -p "$dir/spool/$host"
    slurmd || die "slurmd failed: $(tail -5 "$dir/log/slurmd-$host.log")"
  else
    local name addr ns
    while read -r name addr ns; do
      start_node_slurmd "$dir" "$name" "$ns"
    done <"$dir/nodes.txt"
  fi
  wait_for 60 nodes_idle || die "nodes not idle: $(sinfo -N 2>&1; tail -5 "$dir"/log/slurmd-*.log "$dir/log/slurmctld.log")"
  wait_for 30 sacct -n -X -S now || die "sacct does not answer"

  cat >"$dir/env.sh" <<EOF
# Source me for this cluster's clients (sbatch, squeue, sacct, scontrol).
export SLURM_CONF=$dir/slurm.conf
export PATH=\$PATH:/usr/sbin:/usr/bin:/sbin:/bin
EOF
  log "cluster up in $((SECONDS - t0)) s: $dir (node(s) $node_names, $cpus CPUs and ${mem_mb} MB each)"
}

# TERM the processes in pid files "$@" together (each takes ~2 s to exit; a throwaway cluster need not shut down
# in order), KILL whatever is left after 20 s.
stop_pids() {
  local f pid pids=() end
  for f in "$@"; do
    pid=$(cat "$f" 2>/dev/null) || continue
    kill "$pid" 2>/dev/null && pids+=("$pid")  # daemons remove their own pid file as they exit
  done
  end=$((SECONDS + 20))
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null; do
      if [ $SECONDS -ge $end ]; then log "killing $pid"; kill -9 "$pid" 2>/dev/null || true; break; fi
      sleep 0.1
    done
  done
  rm -f "$@"
}

cmd_stop() {
  local dir=${1:?usage: stop DIR} mdir=""
  [ -d "$dir" ] || return 0
  dir=$(cd "$dir" && pwd)
  export SLURM_CONF="$dir/slurm.conf"
  # Jobs first, so no slurmstepd outlives slurmd.
  if [ -s "$dir/run/slurmctld.pid" ] && kill -0 "$(cat "$dir/run/slurmctld.pid")" 2>/dev/null; then
    scancel --full --user=root 2>/dev/null || true
    wait_for 15 no_jobs || log "jobs still running at stop"
  fi
  [ -L "$dir/munge/dir" ] && mdir=$(readlink "$dir/munge/dir")
  stop_pids "$dir"/run/slurmd*.pid "$dir"/run/{slurmctld,slurmdbd,mysqld}.pid ${mdir:+"$mdir/munged.pid"}
  [ -z "$mdir" ] || rm -rf "$mdir" "$dir/munge/dir"
  stop_network "$dir"
  log "stopped $dir"
}

# Whatever still runs in a node's namespace (a job step a dead slurmd left, a Ray worker) is killed, then the
# namespaces, veths and the bridge go.
stop_network() {
  local dir=$1 id net name addr ns pids
  [ -f "$dir/network" ] || return 0
  read -r id net <"$dir/network"
  while read -r name addr ns; do
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done <"$dir/nodes.txt"
  ip link del "spb$id" 2>/dev/null || true
  rm -f "$dir/network"
}

# The "name addr netns" line of node $2 in cluster DIR=$1.
node_line() {
  [ -f "$1/nodes.txt" ] || die "$1 has no nodes.txt: node-kill/node-start need a cluster of 2 or more nodes"
  awk -v n="$2" '$1 == n' "$1/nodes.txt" | grep . || die "no node $2 in $1/nodes.txt"
}

cmd_node_kill() {
  local dir=${1:?usage: node-kill DIR NAME} name=${2:?usage: node-kill DIR NAME} line addr ns pids killed=0 pass
  line=$(node_line "$dir" "$name")
  read -r name addr ns <<<"$line"
  for pass in 1 2 3; do  # a process forked while the first pass ran goes in the next
    pids=$(ip netns pids "$ns")
    [ -n "$pids" ] || break
    kill -9 $pids 2>/dev/null || true
    killed=$((killed + $(wc -w <<<"$pids")))
    sleep 0.2
  done
  log "node $name lost: killed $killed process(es) in $ns"
}

cmd_node_start() {
  local dir=${1:?usage: node-start DIR NAME} name=${2:?usage: node-start DIR NAME} addr ns
  dir=$(cd "$dir" && pwd)
  export SLURM_CONF="$dir/slurm.conf"
  local line
  line=$(node_line "$dir" "$name")
  read -r name addr ns <<<"$line"
  start_node_slurmd "$dir" "$name" "$ns"
  # ReturnToService=2: a node that was DOWN for not responding is back once its slurmd registers.
  wait_for 60 sh -c "[ \"\$(sinfo -h -n $name -o %t)\" = idle ]" \
    || die "node $name not back: $(sinfo -N 2>&1; tail -5 "$dir/log/slurmd-$name.log")"
  log "node $name back in service"
}

# Installs and starts one at a time on this machine (two test processes may each start a cluster): apt and its
# policy-rc.d guard are not for two at once, and a port picked free is only sure to stay free once its daemon has it.
# A directory as the lock (mkdir is atomic), not flock: the daemons started under it would inherit a lock's fd.
serialised() {
  local lock=/tmp/selfplay-slurm-cluster.lock end=$((SECONDS + 900))
  until mkdir "$lock" 2>/dev/null; do
    holder=$(cat "$lock/pid" 2>/dev/null || true)
    if [ -n "$holder" ] && ! kill -0 "$holder" 2>/dev/null; then rm -rf "$lock"; continue; fi  # its holder died
    [ $SECONDS -lt $end ] || die "$lock: another slurm_cluster.sh install/start held it for 15 minutes"
    sleep 0.5
  done
  echo $$ >"$lock/pid"
  AT_EXIT+=("rm -rf $lock")
  "$@"
}

case "${1:-}" in
  install) serialised cmd_install ;;
  start) serialised cmd_start "${2:-}" "${3:-1}" ;;
  stop) cmd_stop "${2:-}" ;;
  node-kill) cmd_node_kill "${2:-}" "${3:-}" ;;
  node-start) cmd_node_start "${2:-}" "${3:-}" ;;
  *) echo "usage: $0 install | start DIR [NODES] | stop DIR | node-kill DIR NAME | node-start DIR NAME" >&2; exit 2 ;;
esac
