#!/usr/bin/env bash
# Bring up a real one-node Slurm cluster (slurmctld + slurmd + munged) on this
# machine, as root, for tests/test_slurm.py (real sbatch / scancel / scontrol requeue and
# partition-priority preemption: partition "high" preempts "debug"). .ci/run calls it.
# Everything it runs and writes is its own: the config is $SLURM_LOCAL_DIR/etc/slurm.conf
# (never /etc/slurm), munged is a private one with its own key and socket under
# $SLURM_LOCAL_DIR (the machine's munged and key, if any, are left alone), and the ports are
# not Slurm's defaults, so it can neither disturb nor be mistaken for a Slurm it did not start.
# Its commands need SLURM_CONF=$SLURM_LOCAL_DIR/etc/slurm.conf (the tests pass it; the
# last line on stdout is `export SLURM_CONF=...`); jobs inherit it.
#
#   bash tests/slurm/local-up.sh          install if needed, write config, start daemons,
#                              wait until the node is idle (idempotent)
#   bash tests/slurm/local-up.sh --fresh  like the above, but first stop the daemons and
#                              wipe $SLURM_LOCAL_DIR (no jobs left from earlier runs)
#   bash tests/slurm/local-up.sh --down   stop the daemons this script started (by PID file)
#
# Runs beside tests/slurm/multinode/up.sh (the 2-host cluster in network namespaces).
#
# Tested on Debian 12 (bookworm), Slurm 22.05.8 (Debian package), munge 0.5.15.
# Env: SLURM_LOCAL_DIR (default /tmp/slurm-local) holds state, spool, logs, pids.
#      SLURM_LOCAL_CRED_EXPIRE (default 10): seconds a requeued job waits before
#      it may start again (Slurm default is 120).
#      SLURM_LOCAL_PORTS (default 6827,6828): SlurmctldPort,SlurmdPort (Slurm's own
#      defaults 6817,6818 are left to a real Slurm on this machine).
set -euo pipefail

R=${SLURM_LOCAL_DIR:-/tmp/slurm-local}
CRED_EXPIRE=${SLURM_LOCAL_CRED_EXPIRE:-10}
CONF=$R/etc/slurm.conf
MUNGE_SOCK=$R/munge/munge.socket
MUNGE_KEY=$R/munge/munge.key
PORTS=${SLURM_LOCAL_PORTS:-6827,6828}
CTLD_PORT=${PORTS%,*} SLURMD_PORT=${PORTS#*,}
MUNGE_PID=$R/munge/munged.pid
CTLD_PID=$R/slurmctld.pid
SLURMD_PID=$R/slurmd.pid
export SLURM_CONF=$CONF
. "$(cd "$(dirname "$0")" && pwd)/shared-conf.sh"  # shared_slurm_conf, shared_slurm_partitions

log() { echo "[slurm-local] $*" >&2; }

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pidfile() {  # stop one daemon by its PID file, never by name
  local f=$1 name=$2 pid
  if alive "$f"; then
    pid=$(cat "$f"); log "stopping $name (pid $pid)"; kill "$pid" || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && { log "$name did not stop, SIGKILL"; kill -9 "$pid" || true; }
  fi
  rm -f "$f"
}

case "${1:-}" in
  --down|--fresh)
    stop_pidfile "$SLURMD_PID" slurmd
    stop_pidfile "$CTLD_PID" slurmctld
    stop_pidfile "$MUNGE_PID" munged  # our private one (its socket is under $R)
    [ "$1" = --down ] && exit 0
    log "wiping $R"; rm -rf "$R" ;;
  "") ;;
  *) echo "usage: $0 [--fresh|--down]" >&2; exit 2 ;;
esac

[ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }

# 1. packages --------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  log "installing slurm + munge from Debian"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

# 2. munge: a private munged with its own key, on a socket under $R ---------
mkdir -p "$R"; chmod 0755 "$R"
install -d -o munge -g munge -m 0755 "$R/munge"
if [ ! -s "$MUNGE_KEY" ]; then
  log "creating munge key $MUNGE_KEY"; mungekey --create --keyfile="$MUNGE_KEY"
  chown munge:munge "$MUNGE_KEY"; chmod 0400 "$MUNGE_KEY"
fi
if ! alive "$MUNGE_PID" || ! munge -S "$MUNGE_SOCK" -n 2>/dev/null | unmunge -S "$MUNGE_SOCK" >/dev/null 2>&1; then
  log "starting munged on $MUNGE_SOCK"
  stop_pidfile "$MUNGE_PID" munged
  rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
  runuser -u munge -- /usr/sbin/munged --socket="$MUNGE_SOCK" --pid-file="$MUNGE_PID" --key-file="$MUNGE_KEY" \
    --log-file="$R/munge/munged.log" --seed-file="$R/munge/munged.seed"   # forks
  for _ in $(seq 1 50); do munge -S "$MUNGE_SOCK" -n 2>/dev/null | unmunge -S "$MUNGE_SOCK" >/dev/null 2>&1 && break; sleep 0.1; done
  munge -S "$MUNGE_SOCK" -n | unmunge -S "$MUNGE_SOCK" >/dev/null
fi

# 3. slurm.conf ------------------------------------------------------------
H=$(hostname -s)
mkdir -p "$R/state" "$R/spool" "$R/log" "$R/etc"
# Node line from the hardware slurmd sees; RealMemory lowered to 85 % so the
# node is never rejected for "Low RealMemory".
NODE=$(slurmd -C | head -n1 | sed -E "s/^NodeName=[^ ]+/NodeName=$H/; s/ RealMemory=([0-9]+)/ RealMemory=__MEM__/")
MEM=$(slurmd -C | head -n1 | sed -E 's/.*RealMemory=([0-9]+).*/\1/')
NODE=${NODE/__MEM__/$(( MEM * 85 / 100 ))}
NEW_CONF=$(cat <<EOF
# generated by tests/slurm/local-up.sh; used only through SLURM_CONF=$CONF
ClusterName=local
SlurmctldHost=$H(127.0.0.1)
$(shared_slurm_conf)
SlurmdSpoolDir=$R/spool
SlurmdPidFile=$SLURMD_PID
SlurmdLogFile=$R/log/slurmd.log
$NODE NodeAddr=127.0.0.1 State=UNKNOWN
$(shared_slurm_partitions)
EOF
)
CONF_CHANGED=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$NEW_CONF" ]; then
  printf '%s\n' "$NEW_CONF" > "$CONF"; CONF_CHANGED=1
fi
if [ "$CONF_CHANGED" = 1 ] && { alive "$CTLD_PID" || alive "$SLURMD_PID"; }; then
  log "config changed: restarting daemons"
  stop_pidfile "$SLURMD_PID" slurmd; stop_pidfile "$CTLD_PID" slurmctld
fi

# 4. daemons (they daemonize and write their PID files under $R) ------------
if ! alive "$CTLD_PID"; then
  log "starting slurmctld"
  (cd "$R" && slurmctld -f "$CONF") # -i would discard saved state; not needed
fi
for _ in $(seq 1 100); do scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.2; done
scontrol ping | grep -q 'is UP' || { log "slurmctld not up"; tail -n 30 "$R/log/slurmctld.log" >&2; exit 1; }

if ! alive "$SLURMD_PID"; then
  log "starting slurmd"
  (cd "$R" && slurmd -f "$CONF")
fi

# 5. wait for the node to be idle -------------------------------------------
state=""
for i in $(seq 1 150); do
  state=$(sinfo -h -n "$H" -o '%T' 2>/dev/null || true)
  case "$state" in
    idle|mixed|allocated) break ;;
    down*|drain*|drained*)
      [ "$i" -gt 10 ] && scontrol update NodeName="$H" State=RESUME 2>/dev/null || true ;;
  esac
  sleep 0.2
done
case "$state" in
  idle|mixed|allocated) log "node $H is $state (slurmctld pid $(cat "$CTLD_PID"), slurmd pid $(cat "$SLURMD_PID"), munged pid $(cat "$MUNGE_PID" 2>/dev/null || echo '?'))" ;;
  *) log "node $H not ready: '$state'"; tail -n 30 "$R/log/slurmd.log" >&2; exit 1 ;;
esac
echo "export SLURM_CONF=$CONF"
