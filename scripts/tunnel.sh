#!/usr/bin/env bash
# Open and keep up the SSH tunnel to the server and fetch its token (on the Linux side):
#   scripts/tunnel.sh [user@host] [-p SSH_PORT] [--local-port N] ...   (all options: --help)
# Defaults come from MYMPS_USER, MYMPS_HOST, MYMPS_SSH_PORT and MYMPS_PORT.
# A thin wrapper over `mymps tunnel`, for people who prefer shell. It uses this checkout's .venv
# (what scripts/dev.sh and `mymps deploy` make) when there is one, else the mymps on PATH.
set -euo pipefail
venv_mymps="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/mymps"
if [ -x "$venv_mymps" ]; then
    exec "$venv_mymps" tunnel "$@"
fi
exec mymps tunnel "$@"
