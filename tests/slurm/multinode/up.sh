#!/usr/bin/env bash
# Bring up a real MULTI-NODE Slurm cluster on ONE Linux machine, as root, for
# tests/test_slurm_multinode.py (the sbatch scripts across 2 hosts). .ci/run calls it
# (with --fresh); the tests' fixture starts it when it is down and they run as root.
# README.md beside this file: design, what was verified, pitfalls, limits.
# Every "host" is a network namespace + UTS namespace + mount namespace:
#
#   login  (root netns, the shell you are in)  10.77.0.254 on bridge mnbr0
#   mnctl  (netns mn-ctl)    slurmctld          10.77.0.1
#   node1  (netns mn-node1)  slurmd             10.77.0.11
#   node2  (netns mn-node2)  slurmd             10.77.0.12   ... nodeN = .(10+N)
#
# Each namespace sees its own hostname, its own eth0 (a veth on the bridge) and a
# private /etc/hosts (bind mount of $R/hosts) and /etc/slurm (bind mount of
# $R/etc), so jobs see node names that resolve to distinct IPs, exactly as on a
# real cluster. munge runs as a private munged on a unix socket under $R (unix
# sockets on a path work across network namespaces). Nothing routes beyond the
# bridge's private /24; the machine's /etc/hosts and /etc/slurm are not touched.
#
#   up.sh [N] [--fresh]
#     N        number of compute nodes (default 2, 1..50)
#     --fresh  first tear everything down and wipe $R (down.sh --purge)
#   Idempotent: run it again and it only (re)starts what is missing; a changed
#   config (e.g. another N) restarts the Slurm daemons.
#   On success the last line on stdout is:  export SLURM_CONF=$R/etc/slurm.conf
#
# Env: MN_SLURM_DIR (default /tmp/mn-slurm)  state, spool, logs, pids, munge socket
#      MN_SLURM_NET (default 10.77.0)        the private /24 to use (first 3 octets)
#      MN_SLURM_CRED_EXPIRE (default 10)     s a requeued job waits before it may run
# Ports (inside the namespaces, so they cannot collide with a one-node Slurm on the
# host): SlurmctldPort 6917, SlurmdPort 6918.
# Tested on Debian 12 (bookworm), Slurm 22.05.8, munge 0.5.15, kernel 6.18.
set -euo pipefail

N=2; FRESH=0
for a in "$@"; do
  case "$a" in
    --fresh) FRESH=1 ;;
    ''|*[!0-9]*) echo "usage: $0 [N] [--fresh]" >&2; exit 2 ;;
    *) N=$a ;;
  esac
done
[ "$N" -ge 1 ] && [ "$N" -le 50 ] || { echo "N must be 1..50" >&2; exit 2; }

R=${MN_SLURM_DIR:-/tmp/mn-slurm}
NET=${MN_SLURM_NET:-10.77.0}
CRED_EXPIRE=${MN_SLURM_CRED_EXPIRE:-10}
BR=mnbr0
CTL_NS=mn-ctl CTL_HOST=mnctl CTL_IP=$NET.1 LOGIN_IP=$NET.254
CTLD_PORT=6917 SLURMD_PORT=6918
CONF=$R/etc/slurm.conf
MUNGE_SOCK=$R/munge/munge.socket
MUNGE_PID=$R/munge/munged.pid
CTLD_PID=$R/run/slurmctld.pid
HERE=$(cd "$(dirname "$0")" && pwd)
export SLURM_CONF=$CONF
T0=$(date +%s%N)

log() { local t=$(( ($(date +%s%N) - T0) / 100000000 )); echo "[mn-slurm +$((t / 10)).$((t % 10))s] $*" >&2; }
node_ip() { echo "$NET.$((10 + $1))"; }

. "$HERE/pids.sh"  # alive, running, stop_pidfile
. "$HERE/../shared-conf.sh"  # shared_slurm_conf, shared_slurm_partitions

[ "$(id -u)" = 0 ] || { echo "must run as root" >&2; exit 1; }

if [ "$FRESH" = 1 ]; then
  bash "$HERE/down.sh" --purge
fi

# 1. packages ---------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null \
   || ! command -v ip >/dev/null || ! command -v unshare >/dev/null; then
  log "installing slurm + munge + iproute2 from Debian"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge iproute2 util-linux >/dev/null
fi

mkdir -p "$R"/{etc,state,spool,log,run}
[ -d /etc/slurm ] || mkdir -p /etc/slurm   # bind-mount target (the packages create it)
chmod 0755 "$R"

# 2. network: bridge in the root netns, one netns + veth per host ----------
if ! ip link show "$BR" >/dev/null 2>&1; then
  log "creating bridge $BR ($LOGIN_IP/24)"
  ip link add "$BR" type bridge
fi
[ -w "/proc/sys/net/ipv6/conf/$BR/disable_ipv6" ] && echo 1 > "/proc/sys/net/ipv6/conf/$BR/disable_ipv6"
ip addr replace "$LOGIN_IP/24" dev "$BR"
ip link set "$BR" up

ensure_ns() {  # ensure_ns NETNS IP: netns with lo + eth0 (veth to the bridge) at IP/24
  local ns=$1 addr=$2 hv=mnv-${1#mn-}
  [ -e "/run/netns/$ns" ] || ip netns add "$ns"
  if [ -d /proc/sys/net/ipv6 ]; then  # IPv4 only: no IPv6 link-local chatter, no v6 surprises
    ip netns exec "$ns" sh -c 'for f in /proc/sys/net/ipv6/conf/all/disable_ipv6 /proc/sys/net/ipv6/conf/default/disable_ipv6; do [ -w $f ] && echo 1 > $f; done; true'
  fi
  if ! ip link show "$hv" >/dev/null 2>&1 || ! ip -n "$ns" link show eth0 >/dev/null 2>&1; then
    ip link del "$hv" 2>/dev/null || true
    ip -n "$ns" link del eth0 2>/dev/null || true
    ip link add "$hv" type veth peer name eth0 netns "$ns"
  fi
  [ -w "/proc/sys/net/ipv6/conf/$hv/disable_ipv6" ] && echo 1 > "/proc/sys/net/ipv6/conf/$hv/disable_ipv6"
  ip link set "$hv" master "$BR" up
  ip -n "$ns" addr replace "$addr/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
}

# nodes beyond N left over from an earlier, bigger cluster: stop and remove
for ns in $(ip netns list | awk '{print $1}' | grep -E '^mn-node[0-9]+$' || true); do
  i=${ns#mn-node}
  if [ "$i" -gt "$N" ]; then
    log "removing leftover node$i"
    stop_pidfile "$R/run/slurmd-node$i.pid" slurmd
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    ip netns del "$ns"; ip link del "mnv-node$i" 2>/dev/null || true
  fi
done

ensure_ns "$CTL_NS" "$CTL_IP"
for i in $(seq 1 "$N"); do ensure_ns "mn-node$i" "$(node_ip "$i")"; done

# private /etc/hosts for every namespace
HOSTS="127.0.0.1 localhost
$LOGIN_IP mnlogin
$CTL_IP $CTL_HOST"
for i in $(seq 1 "$N"); do HOSTS="$HOSTS
$(node_ip "$i") node$i"; done
[ "$(cat "$R/hosts" 2>/dev/null)" = "$HOSTS" ] || printf '%s\n' "$HOSTS" > "$R/hosts"
# no DNS inside the cluster: unknown names fail at once on the namespace's own
# loopback instead of trying the machine's nameserver (unreachable from here anyway)
echo "# mn-slurm: no nameserver; names come from /etc/hosts" > "$R/resolv.conf"

# 3. munge: a private munged on a socket under $R ----------------------------
if [ ! -s /etc/munge/munge.key ]; then
  log "creating munge key"; mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
fi
install -d -o munge -g munge -m 0755 "$R/munge"
if ! alive "$MUNGE_PID" munged || ! munge -S "$MUNGE_SOCK" -n 2>/dev/null | unmunge -S "$MUNGE_SOCK" >/dev/null 2>&1; then
  log "starting munged on $MUNGE_SOCK"
  stop_pidfile "$MUNGE_PID" munged
  rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
  runuser -u munge -- /usr/sbin/munged --socket="$MUNGE_SOCK" --pid-file="$MUNGE_PID" \
    --log-file="$R/munge/munged.log" --seed-file="$R/munge/munged.seed"
  for _ in $(seq 1 50); do munge -S "$MUNGE_SOCK" -n 2>/dev/null | unmunge -S "$MUNGE_SOCK" >/dev/null 2>&1 && break; sleep 0.1; done
  munge -S "$MUNGE_SOCK" -n | unmunge -S "$MUNGE_SOCK" >/dev/null
fi

# 4. slurm.conf -------------------------------------------------------------
if [ ! -s "$R/node-hw" ]; then  # topology as slurmd sees it (same for all nodes)
  slurmd -C | head -n1 > "$R/node-hw"
fi
HW=$(sed -E 's/^NodeName=[^ ]+ //; s/ RealMemory=[0-9]+//' "$R/node-hw")
MEM=$(sed -E 's/.*RealMemory=([0-9]+).*/\1/' "$R/node-hw")
NODEMEM=$(( MEM * 85 / 100 / N ))   # <= what each slurmd detects, sums to 85 %
NODELINES=""
for i in $(seq 1 "$N"); do
  NODELINES="${NODELINES}NodeName=node$i NodeAddr=$(node_ip "$i") $HW RealMemory=$NODEMEM State=UNKNOWN
"
done
NEW_CONF=$(cat <<EOF
# generated by up.sh ($N nodes); login=$LOGIN_IP ctl=$CTL_IP
ClusterName=mn
SlurmctldHost=$CTL_HOST($CTL_IP)
$(shared_slurm_conf)
SlurmdSpoolDir=$R/spool/%n
SlurmdPidFile=$R/run/slurmd-%n.pid
SlurmdLogFile=$R/log/slurmd-%n.log
${NODELINES}$(shared_slurm_partitions)
EOF
)
if [ "$(cat "$CONF" 2>/dev/null)" != "$NEW_CONF" ]; then
  printf '%s\n' "$NEW_CONF" > "$CONF"
  if alive "$CTLD_PID" slurmctld || ls "$R"/run/slurmd-*.pid >/dev/null 2>&1; then
    log "config changed: restarting slurm daemons"
    args=(); for f in "$R"/run/slurmd-*.pid; do [ -e "$f" ] && args+=("$f" slurmd); done
    stop_pidfile "${args[@]}" "$CTLD_PID" slurmctld
  fi
fi

# 5. daemons, each in its own netns + UTS (hostname) + mount namespace. In the
#    private mount namespace: /etc/hosts, /etc/resolv.conf and /etc/slurm are
#    bind mounts of ours, /sys is a fresh sysfs (so /sys/class/net shows the node's eth0 + lo) with
#    the real /sys/fs/cgroup tree moved back in (slurmd refuses to start without
#    it: "No filesystem mounted on /sys/fs/cgroup"; `ip netns exec` would lose it).
#    The daemons fork into the background; the namespaces live as long as they do.
in_host() {  # in_host NETNS HOSTNAME CMD...
  local ns=$1 h=$2; shift 2
  mkdir -p "$R/run/.cg-$h"
  nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation private sh -c '
    set -e; h=$1; r=$2; shift 2
    hostname "$h"
    mount --bind "$r/hosts" /etc/hosts
    mount --bind "$r/etc" /etc/slurm
    [ -f /etc/resolv.conf ] && mount --bind "$r/resolv.conf" /etc/resolv.conf
    if [ -d /sys/fs/cgroup ]; then
      mount --rbind /sys/fs/cgroup "$r/run/.cg-$h"
      umount -l /sys; mount -t sysfs sysfs /sys
      mount --move "$r/run/.cg-$h" /sys/fs/cgroup
    fi
    cd "$r"; exec "$@"' sh "$h" "$R" "$@"
}

if ! alive "$CTLD_PID" slurmctld; then
  log "starting slurmctld on $CTL_HOST ($CTL_IP:$CTLD_PORT)"
  in_host "$CTL_NS" "$CTL_HOST" slurmctld -f "$CONF"
fi
for _ in $(seq 1 100); do scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.2; done
scontrol ping | grep -q 'is UP' || { log "slurmctld not up"; tail -n 30 "$R/log/slurmctld.log" >&2; exit 1; }

for i in $(seq 1 "$N"); do
  if ! alive "$R/run/slurmd-node$i.pid" slurmd; then
    mkdir -p "$R/spool/node$i"
    log "starting slurmd on node$i ($(node_ip "$i"):$SLURMD_PORT)"
    in_host "mn-node$i" "node$i" slurmd -f "$CONF" -N "node$i"
  fi
done

# helper to run a command "on" a host: $R/bin/mn-on node1 [CMD...] (default bash)
mkdir -p "$R/bin"
cat > "$R/bin/mn-on" <<EOF
#!/bin/sh
# mn-on HOST [CMD...]: run CMD (default bash) in the namespaces of HOST (mnctl, node1, ...)
h=\${1:?usage: mn-on HOST [CMD...]}; shift
case "\$h" in mnctl) f=$R/run/slurmctld.pid ;; *) f=$R/run/slurmd-\$h.pid ;; esac
[ -s "\$f" ] || { echo "no daemon pid file for \$h (\$f)" >&2; exit 1; }
[ \$# -gt 0 ] || set -- bash
exec nsenter -t "\$(cat "\$f")" -n -u -m -- "\$@"
EOF
chmod +x "$R/bin/mn-on"

# 6. wait until every node is up -------------------------------------------
bad=""
for k in $(seq 1 150); do
  bad=$(sinfo -h -N -o '%N %T' 2>/dev/null | awk '$2 !~ /^(idle|mixed|allocated|completing)$/' | sort -u || true)
  states=$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u | wc -l)
  [ -z "$bad" ] && [ "$states" -ge "$N" ] && break
  if [ "$k" = 25 ]; then  # after 5 s, resume nodes that a restart left down
    for nd in $(echo "$bad" | awk '$2 ~ /^(down|drain)/ {print $1}'); do
      scontrol update NodeName="$nd" State=RESUME 2>/dev/null || true
    done
  fi
  sleep 0.2
done
if [ -n "$bad" ]; then
  log "nodes not ready: $(echo "$bad" | tr '\n' ' ')"
  for i in $(seq 1 "$N"); do tail -n 5 "$R/log/slurmd-node$i.log" >&2 2>/dev/null || true; done
  exit 1
fi
log "cluster up: $(sinfo -h -N -o '%N=%T' | sort -u | tr '\n' ' ')(slurmctld pid $(cat "$CTLD_PID"))"
echo "export SLURM_CONF=$CONF"
