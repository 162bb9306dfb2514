#!/usr/bin/env bash
# Start a single-node Ray head on this machine for local testing, reachable from this machine only.
#
#   bash cluster/start-local.sh [extra `ray start` flags, e.g. --num-gpus=1]
#
# Settings (environment variables, all optional):
#   RAY_BIN             the `ray` executable (default: .venv/bin/ray in the repo if present, else `ray` on PATH)
#   RAY_PORT            GCS port                     (default 6379)
#   RAY_DASHBOARD_PORT  dashboard / job API port     (default 8265)
#   RAY_NUM_CPUS        CPUs Ray may schedule on     (default: all of them, from nproc)
#   RAY_START_TIMEOUT_S how long to wait for the job API (default 180)
#
# The head runs as `ray start --head --block` in a process group of its own, whose id is written to
# .ray-local/head-$RAY_PORT.pid (its log beside it). Stop it with: bash cluster/stop-local.sh, which
# stops that group only: other Ray processes on this machine (another checkout's, a test's, your
# own) are left alone, where `ray stop` would stop them all.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [[ -n "${RAY_BIN:-}" ]]; then
  ray_bin="$RAY_BIN"
elif [[ -x "$repo_root/.venv/bin/ray" ]]; then
  ray_bin="$repo_root/.venv/bin/ray"
elif ray_bin="$(command -v ray)"; then
  :
else
  echo "start-local.sh: no 'ray' found; set RAY_BIN, create .venv (pip install -e .), or put ray on PATH" >&2
  exit 1
fi

port="${RAY_PORT:-6379}"
dashboard_port="${RAY_DASHBOARD_PORT:-8265}"
num_cpus="${RAY_NUM_CPUS:-$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)}"

# Loopback only. On Linux `ray start` rewrites --node-ip-address=127.0.0.1 to the machine's routable
# address unless this variable is 0; with it, the node address stays 127.0.0.1, so the GCS, raylet,
# object manager and agents listen on 127.0.0.1 only (the dashboard follows --dashboard-host). It also
# makes `ray start --address=...` refuse to join other nodes: this cluster is single-node by design.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0

# Token authentication (Ray's default for new local clusters) stays on: make sure a token exists.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [[ "$RAY_AUTH_MODE" == token && -z "${RAY_AUTH_TOKEN:-}" && ! -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]]; then
  "$ray_bin" get-auth-token --generate >/dev/null
fi

state_dir="$repo_root/.ray-local"
pid_file="$state_dir/head-$port.pid"
log_file="$state_dir/head-$port.log"
mkdir -p "$state_dir"
if [[ -s "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
  echo "start-local.sh: a head started here already runs on port $port (pid $(cat "$pid_file")); stop it with cluster/stop-local.sh" >&2
  exit 1
fi

# setsid: the head and everything it starts form their own process group, which stop-local.sh stops.
setsid "$ray_bin" start --head --block \
  --node-ip-address=127.0.0.1 \
  --port="$port" \
  --dashboard-host=127.0.0.1 \
  --dashboard-port="$dashboard_port" \
  --include-dashboard=true \
  --num-cpus="$num_cpus" \
  --disable-usage-stats \
  "$@" >"$log_file" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$pid_file"

# Ready when the dashboard's job API answers (what `ray job submit` needs), bounded.
deadline=$((SECONDS + ${RAY_START_TIMEOUT_S:-180}))
until "$ray_bin" job list --address "http://127.0.0.1:$dashboard_port" >/dev/null 2>&1; do
  if ! kill -0 "$pid" 2>/dev/null; then
    rm -f "$pid_file"
    echo "start-local.sh: ray start exited; its log ($log_file) ends with:" >&2
    tail -n 20 "$log_file" >&2
    exit 1
  fi
  if (( SECONDS >= deadline )); then
    echo "start-local.sh: the job API did not answer within ${RAY_START_TIMEOUT_S:-180} s; stopping the head" >&2
    bash "$repo_root/cluster/stop-local.sh" >&2 || true
    exit 1
  fi
  sleep 1
done

cat <<MSG

Local Ray head is up (loopback only, ${num_cpus} CPUs).

Submit jobs through the dashboard's job API:
  export RAY_ADDRESS=http://127.0.0.1:${dashboard_port}
  ${ray_bin} job submit --working-dir . --runtime-env-json '{"excludes": [".venv", ".git"]}' -- \\
    python jobs/run_request.py examples/request.yaml --storage /tmp/spinml

To connect a Python driver directly instead (not through 'ray job submit'), use the GCS address and the
same loopback setting, and do not leave RAY_ADDRESS set to the http:// address in that shell:
  export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_ADDRESS=127.0.0.1:${port}

Dashboard: http://127.0.0.1:${dashboard_port}
Stop:      bash cluster/stop-local.sh
MSG
