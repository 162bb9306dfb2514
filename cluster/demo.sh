#!/usr/bin/env bash
# `make demo`: start a local Ray head (loopback only), submit the example request as a Ray job,
# stop the cluster again, and print where the results are. Offline: tiny built-in models.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
export PATH="$repo_root/.venv/bin:$PATH"   # the job's `python` must be the project's environment
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# Token authentication on (start-local.sh creates ~/.ray/auth_token if missing); every client uses it.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
export RAY_PORT="${RAY_PORT:-6379}" RAY_DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
storage="${SPINML_STORAGE:-$repo_root/spinml-data}"
request="${SPINML_REQUEST:-examples/request.yaml}"

if (exec 3<>"/dev/tcp/127.0.0.1/$RAY_PORT") 2>/dev/null; then
  echo "demo: something (a Ray cluster?) already listens on 127.0.0.1:$RAY_PORT; stop it or set RAY_PORT/RAY_DASHBOARD_PORT" >&2
  exit 1
fi
# The dashboard agent and metrics get free ports, so the demo runs beside another local Ray.
read -r agent_port metrics_port < <(python - <<'PY'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
PY
)
bash cluster/start-local.sh --dashboard-agent-listen-port="$agent_port" --metrics-export-port="$metrics_port" >/dev/null
trap 'bash cluster/stop-local.sh >/dev/null 2>&1 || true' EXIT

ray job submit --address "http://127.0.0.1:$RAY_DASHBOARD_PORT" --working-dir . \
  --runtime-env-json '{"excludes": [".venv", ".git", "spinml-data", "*.egg-info", ".pytest_cache", ".hypothesis"]}' \
  -- python jobs/run_request.py "$request" --storage "$storage"

result="$(python - "$request" "$storage" <<'PY'
import sys
from spinml_ray.spec import load_request
from spinml_ray import storage
spec = load_request(sys.argv[1])
print(storage.join(sys.argv[2], spec.tenant, spec.request_id))
PY
)"
echo
echo "Demo finished. Results: $result"
echo "  sanitized/  what left each reference, per object and level (Parquet, with MI)"
echo "  synthetic/  generated images with prompts and seeds (Parquet)"
echo "  model/      model.pt, model.onnx, model.torchscript.pt, metrics.json, settings.json"
