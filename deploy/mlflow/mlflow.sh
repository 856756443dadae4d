#!/usr/bin/env bash
# A real MLflow tracking server (`mlflow server`) for driftloop's tests and demo.
#
#   mlflow.sh start DIR [PORT]    start a server whose files live in DIR; prints the
#                                 tracking URI http://127.0.0.1:PORT on stdout
#   mlflow.sh stop DIR            SIGTERM to its process group, up to
#                                 DRIFTLOOP_MLFLOW_STOP_TIMEOUT s, then SIGKILL
#   mlflow.sh status DIR          "running pid=N uri=..." (exit 0) or "stopped" (exit 3)
#
# Exit codes: 0 ok, 1 failure, 2 usage, 3 status: stopped, 4 mlflow not installed.
#
# DIR holds the backend store (DIR/mlflow.db, SQLite), the artifacts (DIR/artifacts)
# and the log (DIR/mlflow.log). The server *serves* the artifacts (--serve-artifacts):
# runs get mlflow-artifacts:/ URIs, and any client that can reach the tracking URI
# reads and writes them through the server, from any process or machine, with no
# access to DIR. See docs/mlflow.md.
#
# Environment:
#   DRIFTLOOP_MLFLOW_BACKEND_URI   backend store instead of sqlite:///DIR/mlflow.db
#                                  (e.g. postgresql://user@127.0.0.1:5432/mlflow)
#   DRIFTLOOP_MLFLOW_PYTHON        the interpreter with mlflow installed (default:
#                                  the repository's .venv, else python3)
#   DRIFTLOOP_MLFLOW_WORKERS       uvicorn workers (default 1: a test server on 2 cores)
#   DRIFTLOOP_MLFLOW_START_TIMEOUT / DRIFTLOOP_MLFLOW_STOP_TIMEOUT   seconds (120 / 30)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

if [[ -n "${DRIFTLOOP_MLFLOW_PYTHON:-}" ]]; then
  PYTHON=$DRIFTLOOP_MLFLOW_PYTHON
elif [[ -x "$REPO/.venv/bin/python" ]]; then
  PYTHON=$REPO/.venv/bin/python
else
  PYTHON=python3
fi
WORKERS=${DRIFTLOOP_MLFLOW_WORKERS:-1}
START_TIMEOUT=${DRIFTLOOP_MLFLOW_START_TIMEOUT:-120}
STOP_TIMEOUT=${DRIFTLOOP_MLFLOW_STOP_TIMEOUT:-30}

# No usage reporting from the server (MLflow 3 has telemetry, on by default), and no
# job runner: it serves GenAI evaluation jobs we never submit and costs a process.
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false

die() { echo "mlflow.sh: $*" >&2; exit 1; }
note() { echo "mlflow.sh: $*" >&2; }
missing() { echo "mlflow.sh: $*" >&2; exit 4; }

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" >&2
  exit 2
}

abspath() { mkdir -p "$1" && (cd "$1" && pwd -P); }

port_in_use() {
  if command -v ss >/dev/null 2>&1; then
    [[ -n "$(ss -Htln "sport = :$1" 2>/dev/null)" ]]
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
  fi
}

# A random free port below the kernel's ephemeral range (as deploy/kafka/kafka.sh):
# outgoing connections never take it between the check and the bind.
free_port() {
  local lo=15000 hi eph_lo eph_hi p i
  read -r eph_lo eph_hi </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || { eph_lo=32768; eph_hi=60999; }
  hi=$((eph_lo - 1))
  if (( hi - lo < 1000 )); then lo=$((eph_hi + 1)); hi=65535; fi
  for ((i = 0; i < 200; i++)); do
    p=$((lo + (RANDOM * 32768 + RANDOM) % (hi - lo + 1)))
    port_in_use "$p" || { echo "$p"; return 0; }
  done
  die "found no free port in $lo-$hi"
}

# The pid in DIR/mlflow.pid if that process is alive and is this DIR's server (a stale
# pid file may name a recycled pid: never signal that one). The server runs in a
# session of its own, so the pid is also its process group's id.
running_pid() {
  local dir=$1 pid
  [[ -f "$dir/mlflow.pid" ]] || return 1
  pid=$(cat "$dir/mlflow.pid" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [[ -r "/proc/$pid/cmdline" ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "--artifacts-destination $dir/artifacts" || return 1
  echo "$pid"
}

alive() {
  kill -0 "$1" 2>/dev/null || return 1
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [[ "${stat:0:1}" != Z ]]
}

# Any live process left in the server's process group (the uvicorn workers). Zombies
# do not count: the server is not our child once start returns, and whatever reaps it
# (init, a container's pid 1) may take its time.
group_alive() { ps -o stat= -g "$1" 2>/dev/null | grep -qv '^Z'; }

# GET /health over bash's /dev/tcp (no curl needed): 200 once the app serves.
healthy() {
  local port=$1 status
  exec 3<>"/dev/tcp/127.0.0.1/$port" || return 1
  printf 'GET /health HTTP/1.0\r\nHost: localhost:%s\r\n\r\n' "$port" >&3 || { exec 3>&-; return 1; }
  status=$(timeout 2 head -n 1 <&3) || true
  exec 3>&-
  [[ "$status" == *" 200 "* ]]
}

cmd_start() {
  [[ $# -ge 1 && $# -le 2 ]] || usage
  local dir port="${2:-}" pid backend
  dir=$(abspath "$1")
  [[ -z "$port" || "$port" =~ ^[0-9]+$ ]] || die "PORT must be a number, got '$port'"
  command -v "$PYTHON" >/dev/null 2>&1 || missing "$PYTHON not found (set DRIFTLOOP_MLFLOW_PYTHON)"
  "$PYTHON" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("mlflow") is None)' >/dev/null 2>&1 ||
    missing "mlflow is not installed for $PYTHON (pip install -e '.[test]', or set DRIFTLOOP_MLFLOW_PYTHON)"
  mkdir -p "$dir/artifacts"

  exec 9>"$dir/.mlflow.sh.lock"
  command -v flock >/dev/null 2>&1 && flock 9

  if pid=$(running_pid "$dir"); then
    local running
    running=$(cat "$dir/uri")
    [[ -z "$port" || "$running" == "http://127.0.0.1:$port" ]] ||
      die "a server already runs from $dir on $running (pid $pid), not on port $port"
    echo "$running"
    return 0
  fi
  rm -f "$dir/mlflow.pid"

  local auto_port=0
  if [[ -z "$port" && -f "$dir/uri" ]]; then
    # Same DIR again: the same address, if nothing else took it meanwhile.
    port=$(sed -n 's|^http://127\.0\.0\.1:\([0-9]*\)$|\1|p' "$dir/uri")
    if [[ -n "$port" ]] && port_in_use "$port"; then
      note "port $port of the last run is taken now: picking another"
      port=""
    fi
  fi
  if [[ -z "$port" ]]; then
    port=$(free_port)
    auto_port=1
  elif port_in_use "$port"; then
    die "port $port on 127.0.0.1 is already in use"
  fi
  backend=${DRIFTLOOP_MLFLOW_BACKEND_URI:-sqlite:///$dir/mlflow.db}
  echo "http://127.0.0.1:$port" >"$dir/uri"

  # A session of its own (setsid): stop signals the whole group, the server and its
  # uvicorn workers, and closing a demo's terminal does not take it down.
  setsid "$PYTHON" -m mlflow server \
    --backend-store-uri "$backend" \
    --serve-artifacts --artifacts-destination "$dir/artifacts" \
    --host 127.0.0.1 --port "$port" --workers "$WORKERS" \
    >>"$dir/mlflow.log" 2>&1 </dev/null 9>&- &
  pid=$!
  echo "$pid" >"$dir/mlflow.pid"

  local t0=$SECONDS
  until healthy "$port" 2>/dev/null; do
    if ! alive "$pid"; then
      rm -f "$dir/mlflow.pid"
      tail -n 30 "$dir/mlflow.log" >&2
      if (( auto_port )) && grep -q 'Address already in use' "$dir/mlflow.log" 2>/dev/null; then
        die "the server lost a race for port $port: run start again"
      fi
      die "the server exited during startup (log: $dir/mlflow.log)"
    fi
    if (( SECONDS - t0 >= START_TIMEOUT )); then
      tail -n 30 "$dir/mlflow.log" >&2
      cmd_stop "$dir" >/dev/null 2>&1 || true
      die "the server did not answer on 127.0.0.1:$port within ${START_TIMEOUT}s (log: $dir/mlflow.log)"
    fi
    sleep 0.1
  done
  exec 9>&-
  echo "http://127.0.0.1:$port"
}

cmd_stop() {
  [[ $# -eq 1 ]] || usage
  local dir pid i
  [[ -d "$1" ]] || return 0
  dir=$(cd "$1" && pwd -P)
  if ! pid=$(running_pid "$dir"); then
    rm -f "$dir/mlflow.pid"
    return 0
  fi
  kill -TERM -- "-$pid" 2>/dev/null || true
  for ((i = 0; i < STOP_TIMEOUT * 20; i++)); do
    group_alive "$pid" || break
    sleep 0.05
  done
  if group_alive "$pid"; then
    note "server group $pid ignored SIGTERM for ${STOP_TIMEOUT}s: SIGKILL"
    kill -KILL -- "-$pid" 2>/dev/null || true
    while alive "$pid"; do sleep 0.05; done
  fi
  rm -f "$dir/mlflow.pid"
}

cmd_status() {
  [[ $# -eq 1 ]] || usage
  local dir pid
  if [[ -d "$1" ]] && dir=$(cd "$1" && pwd -P) && pid=$(running_pid "$dir"); then
    echo "running pid=$pid uri=$(cat "$dir/uri")"
    return 0
  fi
  echo "stopped"
  return 3
}

case "${1:-}" in
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  status) shift; cmd_status "$@" ;;
  -h | --help | help) usage ;;
  *) usage ;;
esac
