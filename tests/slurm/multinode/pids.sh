# Process helpers that up.sh and down.sh share (sourced; each defines log()). alive PIDFILE COMM:
# the pid file names a live process with that command name. Daemons are found by
# their PID files only, never by name, so nothing outside this cluster is touched.

alive() { local p; [ -s "$1" ] && p=$(cat "$1") && running "$p" && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$2" ]; }

running() { [ -r "/proc/$1/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status"; }  # zombies count as gone

stop_pidfile() {  # stop_pidfile FILE COMM [FILE COMM ...]: SIGTERM all, wait, SIGKILL; by PID file only
  local pids="" f pid
  while [ $# -ge 2 ]; do
    f=$1
    if alive "$1" "$2"; then pid=$(cat "$1"); log "stopping $2 (pid $pid)"; kill "$pid" 2>/dev/null || true; pids="$pids $pid"; fi
    rm -f "$f"; shift 2
  done
  for _ in $(seq 1 100); do
    local any=0; for pid in $pids; do running "$pid" && any=1; done
    [ "$any" = 0 ] && return 0; sleep 0.1
  done
  for pid in $pids; do running "$pid" && { log "pid $pid did not stop, SIGKILL"; kill -9 "$pid" 2>/dev/null || true; }; done
  return 0
}
