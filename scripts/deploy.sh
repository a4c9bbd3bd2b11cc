#!/usr/bin/env bash
# Copy this project to the remote machine and install the server there (from the Linux side):
#   scripts/deploy.sh [user@host] [--remote-dir DIR] [--dry-run] ...   (all options: --help)
# Defaults come from MYMPS_USER, MYMPS_HOST and MYMPS_SSH_PORT.
# A thin wrapper over `mymps deploy`, for people who prefer shell. It uses this checkout's .venv
# (what scripts/dev.sh and `mymps deploy` make) when there is one, else the mymps on PATH.
set -euo pipefail
venv_mymps="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/mymps"
if [ -x "$venv_mymps" ]; then
    exec "$venv_mymps" deploy "$@"
fi
exec mymps deploy "$@"
