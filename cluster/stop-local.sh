#!/usr/bin/env bash
# Stop the local Ray started by cluster/start-local.sh.
#
#   bash cluster/stop-local.sh [--force]
#
# Uses the same `ray` as start-local.sh: $RAY_BIN, else .venv/bin/ray in the repo, else `ray` on PATH.
# Note: `ray stop` stops every Ray process on the machine that it is allowed to signal (all of them when
# run as root), not only this head.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [[ -n "${RAY_BIN:-}" ]]; then
  ray_bin="$RAY_BIN"
elif [[ -x "$repo_root/.venv/bin/ray" ]]; then
  ray_bin="$repo_root/.venv/bin/ray"
elif ray_bin="$(command -v ray)"; then
  :
else
  echo "stop-local.sh: no 'ray' found; set RAY_BIN, create .venv (pip install -e .), or put ray on PATH" >&2
  exit 1
fi

"$ray_bin" stop "$@"
