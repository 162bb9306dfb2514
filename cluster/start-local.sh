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
#
# Stop it with: bash cluster/stop-local.sh
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

"$ray_bin" start --head \
  --node-ip-address=127.0.0.1 \
  --port="$port" \
  --dashboard-host=127.0.0.1 \
  --dashboard-port="$dashboard_port" \
  --include-dashboard=true \
  --num-cpus="$num_cpus" \
  --disable-usage-stats \
  "$@"

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
