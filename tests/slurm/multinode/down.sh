#!/usr/bin/env bash
# Tear down what tests/slurm/multinode/up.sh built, and nothing else:
#   1. slurmd (one per node), slurmctld and the private munged, by their PID files
#   2. every process still inside the cluster's network namespaces (job steps,
#      tasks that escaped), found with `ip netns pids`, so by id, never by name
#   3. the namespaces mn-ctl and mn-node<N>, the veths mnv-*, the bridge mnbr0
#   --purge also removes $MN_SLURM_DIR (default /tmp/mn-slurm): state, logs, conf.
# Jobs of this cluster are cancelled first (scancel) while slurmctld answers.
# Without --purge the Slurm state (job ids, finished jobs) is kept for the next up.
# The machine's /etc/hosts, /etc/slurm and mount table are never changed by the
# up script (its bind mounts live in private mount namespaces), so nothing to undo.
# Safe to run when nothing (or only part) is up.
set -uo pipefail

PURGE=0
case "${1:-}" in
  --purge) PURGE=1 ;;
  "") ;;
  *) echo "usage: $0 [--purge]" >&2; exit 2 ;;
esac
R=${MN_SLURM_DIR:-/tmp/mn-slurm}
BR=mnbr0
T0=$(date +%s%N)
log() { local t=$(( ($(date +%s%N) - T0) / 100000000 )); echo "[mn-slurm-down +$((t / 10)).$((t % 10))s] $*" >&2; }
[ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }

. "$(cd "$(dirname "$0")" && pwd)/pids.sh"

# 0. cancel this cluster's jobs while the controller still answers, so the saved
#    state does not list jobs as RUNNING whose processes we are about to kill (a
#    restarted "node" has the same boot time, so slurmctld would wait for them)
export SLURM_CONF=$R/etc/slurm.conf
if alive "$R/run/slurmctld.pid" slurmctld && [ -f "$SLURM_CONF" ]; then
  jobs=$(timeout 5 squeue -h -o %A 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    log "cancelling jobs: $jobs"; timeout 5 scancel $jobs 2>/dev/null
    for _ in $(seq 1 50); do [ -z "$(timeout 5 squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.1; done
  fi
fi

# 1. slurm daemons by pid file, all at once (munged goes last, below)
args=(); for f in "$R"/run/slurmd-*.pid; do [ -e "$f" ] && args+=("$f" slurmd); done
stop_pidfile "${args[@]}" "$R/run/slurmctld.pid" slurmctld

# 2. anything still running inside our namespaces (slurmstepd, job tasks)
NSS=$(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^mn-(ctl|node[0-9]+)$' || true)
pids_in_ns() { for ns in $NSS; do ip netns pids "$ns" 2>/dev/null; done; }
left=$(pids_in_ns)
if [ -n "$left" ]; then
  log "SIGTERM to $(echo $left | wc -w) leftover process(es) in the namespaces: $(echo $left)"
  for p in $left; do kill "$p" 2>/dev/null || true; done
  for _ in $(seq 1 30); do [ -z "$(pids_in_ns)" ] && break; sleep 0.1; done
  left=$(pids_in_ns)
  if [ -n "$left" ]; then
    log "SIGKILL to $(echo $left)"; for p in $left; do kill -9 "$p" 2>/dev/null || true; done
    for _ in $(seq 1 30); do [ -z "$(pids_in_ns)" ] && break; sleep 0.1; done
  fi
fi
stop_pidfile "$R/munge/munged.pid" munged

# 3. namespaces, links, bridge
for ns in $NSS; do log "deleting netns $ns"; ip netns del "$ns" 2>/dev/null || true; done
for l in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E '^mnv-(ctl|node[0-9]+)$' || true); do
  ip link del "$l" 2>/dev/null || true
done
if ip link show "$BR" >/dev/null 2>&1; then log "deleting bridge $BR"; ip link del "$BR"; fi

if [ "$PURGE" = 1 ] && [ -d "$R" ]; then log "removing $R"; rm -rf "$R"; fi
exit 0
