#!/usr/bin/env bash
# Stop the local Ray head started by cluster/start-local.sh (on $RAY_PORT, default 6379), and only it.
#
#   bash cluster/stop-local.sh [--force]
#
# It signals the head's own process group (recorded in .ray-local/head-$RAY_PORT.pid): SIGTERM, which
# `ray start --block` answers by stopping what it started, then SIGKILL for whatever is left after
# RAY_STOP_TIMEOUT_S seconds (default 60), or at once with --force. Other Ray processes on this
# machine are left alone (`ray stop` would stop every one it may signal).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
port="${RAY_PORT:-6379}"
pid_file="$repo_root/.ray-local/head-$port.pid"
force=0
case "${1:-}" in
  "") ;;
  --force) force=1 ;;
  *) echo "usage: stop-local.sh [--force]" >&2; exit 2 ;;
esac

if [[ ! -s "$pid_file" ]]; then
  echo "stop-local.sh: no head started by start-local.sh on port $port ($pid_file missing)"
  exit 0
fi
pgid="$(cat "$pid_file")"
if [[ ! "$pgid" =~ ^[0-9]+$ ]]; then
  echo "stop-local.sh: $pid_file does not hold a process id" >&2
  exit 1
fi

group_alive() { kill -0 -- "-$pgid" 2>/dev/null; }

if (( ! force )) && group_alive; then
  kill -TERM -- "-$pgid" 2>/dev/null || true
  deadline=$((SECONDS + ${RAY_STOP_TIMEOUT_S:-60}))
  while group_alive && (( SECONDS < deadline )); do sleep 0.5; done
fi
if group_alive; then
  kill -KILL -- "-$pgid" 2>/dev/null || true
fi
rm -f "$pid_file"
# `ray start` names its head in Ray's address file, and a later `ray.init()` on this machine takes that
# head for a running cluster even once it is gone (with `num_cpus`, it refuses to start its own). `ray stop`
# removes the file; so does this, when it still names this head. The path is Ray's default on Linux.
address_file="${RAY_TMPDIR:-${TMPDIR:-/tmp}}/ray/ray_current_cluster"
if [[ -f "$address_file" && "$(cat "$address_file")" == "127.0.0.1:$port" ]]; then
  rm -f "$address_file"
fi
echo "stopped the local Ray head on port $port (process group $pgid)"
