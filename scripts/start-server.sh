#!/usr/bin/env bash
# Start the server on this machine (the Mac):
#   scripts/start-server.sh [--port N] [--preload NAME] ...   (all options: --help)
# Every option is also an environment variable MYMPS_<OPTION>.
# A thin wrapper over `mymps serve`, for people who prefer shell. It uses this checkout's .venv
# (what scripts/dev.sh and `mymps deploy` make) when there is one, else the mymps on PATH.
set -euo pipefail
venv_mymps="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/mymps"
if [ -x "$venv_mymps" ]; then
    exec "$venv_mymps" serve "$@"
fi
exec mymps serve "$@"
