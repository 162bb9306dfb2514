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
echo "stopped the local Ray head on port $port (process group $pgid)"
