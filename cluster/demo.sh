#!/usr/bin/env bash
# `make demo`: start a local Ray head (loopback only), submit a request as a Ray job, stop the cluster
# again, and print where the results are. Offline.
# Where the `spinbench` model's weights are installed (spinbench/weights/), the request is a SpinBench
# user's, run on that model, and the trained model's accuracy on the user's real test images is
# printed beside chance, with a picture; otherwise it is the example request on the `tiny` model
# (random weights: noise and chance, the plumbing only).
#   SPINML_DEMO_USER=N      another SpinBench user (default 1; docs/SPINBENCH.md, "The demo and the smoke test", says why)
#   SPINML_DEMO_PRIVACY=..  the levels, target_background (default L2_L0: the dog's pixels, nothing of the room)
#   SPINML_REQUEST=FILE     run this request instead, on SPINML_MODEL (default tiny)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
export PATH="$repo_root/.venv/bin:$PATH"   # the job's `python` must be the project's environment
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# Token authentication on (start-local.sh creates ~/.ray/auth_token if missing); every client uses it.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
export RAY_PORT="${RAY_PORT:-6379}" RAY_DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
storage="${SPINML_STORAGE:-$repo_root/spinml-data}"
if [[ -n "${SPINML_REQUEST:-}" ]]; then
  request="$SPINML_REQUEST" model="${SPINML_MODEL:-tiny}"
elif ! python -c 'from spinml_ray.models import source; source.resolve("spinbench")' 2>/dev/null; then
  echo "demo: the spinbench model's weights are not installed (make spinbench-model builds them); running the tiny example"
  request=examples/request.yaml model=tiny
else
  # The shipped folder by path: the job runs on this machine, and the weights stay out of the working
  # directory Ray uploads for the job (excluded below).
  model="$repo_root/spinbench/weights"
  request="$(python -m spinbench.cli world --user-seed "${SPINML_DEMO_USER:-1}" \
    --privacy "${SPINML_DEMO_PRIVACY:-L2_L0}" --images-per-label 32 --out "$storage/demo-world/user-${SPINML_DEMO_USER:-1}")"
fi

if (exec 3<>"/dev/tcp/127.0.0.1/$RAY_PORT") 2>/dev/null; then
  echo "demo: something (a Ray cluster?) already listens on 127.0.0.1:$RAY_PORT; stop it or set RAY_PORT/RAY_DASHBOARD_PORT" >&2
  exit 1
fi
# The dashboard agent, metrics, Ray client server and the synthesis app's HTTP endpoint get free ports,
# so the demo runs beside another local Ray (or Serve app).
read -r agent_port metrics_port client_port http_port < <(python - <<'PY'
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
PY
)
bash cluster/start-local.sh --dashboard-agent-listen-port="$agent_port" --metrics-export-port="$metrics_port" \
  --ray-client-server-port="$client_port" >/dev/null
trap 'bash cluster/stop-local.sh >/dev/null 2>&1 || true' EXIT

ray job submit --address "http://127.0.0.1:$RAY_DASHBOARD_PORT" --working-dir . \
  --runtime-env-json '{"excludes": [".venv", ".git", ".ray-local", "spinml-data", "spinbench/weights", "*.egg-info", ".pytest_cache", ".hypothesis"]}' \
  -- python jobs/run_request.py "$request" --storage "$storage" --model "$model" --http-port "$http_port"

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
if [[ "$model" != tiny && -z "${SPINML_REQUEST:-}" ]]; then
  python -m spinbench.demo "$request" --storage "$storage" --out "$result/demo.png"
fi
echo "  sanitized/  what left each reference, per object and level (Parquet, with MI)"
echo "  synthetic/  generated images with prompts and seeds (Parquet)"
echo "  model/      model.pt, model.onnx, model.torchscript.pt, metrics.json, settings.json"
