#!/usr/bin/env bash
# Set up (or reuse) a virtual environment and run the demo or the tests, on a fresh machine too.
#   scripts/dev.sh demo          the tiny local demo: server + client on this machine's CPU
#   scripts/dev.sh lint          ruff and mypy over both packages (the configuration is in pyproject.toml)
#   scripts/dev.sh test [ARGS]   lint, then the whole test suite (ARGS go to pytest)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${MYMPS_VENV:-.venv}
python=${PYTHON:-python3}

setup() {
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    # Reinstall only when the dependencies changed: a re-run starts in a second.
    local stamp="$venv/.mymps-installed" want
    want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        # One pip command for everything: the server extra pins torch==2.13.0, so accelerate's
        # torch>=2.0 cannot pull a multi-GB CUDA build.
        echo "setup: installing the project with its server, dashboard and test extras into $venv"
        "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[server,dashboard,test]"
        echo "$want" > "$stamp"
    fi
}

system_packages() {
    # The tunnel and deploy tests drive a real sshd on loopback (and rsync through it).
    if [ ! -x /usr/sbin/sshd ] || ! command -v ssh >/dev/null || ! command -v rsync >/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server openssh-client rsync >/dev/null
        else
            echo "note: openssh-server, openssh-client and rsync are missing; the tunnel and deploy tests will be skipped" >&2
        fi
    fi
    # The browser tests drive Debian's chromium through Playwright, which cannot fetch its own browser here.
    if ! command -v chromium >/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "setup: installing chromium (apt-get) for the browser tests"
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
        else
            echo "note: chromium is missing; the browser tests will be skipped (as root, scripts/dev.sh test installs it)" >&2
        fi
    fi
}

lint() {
    # Both always run, so one call shows every finding; the command fails if either found any.
    local failed=0
    echo "lint: ruff"
    "$venv/bin/ruff" check mymps_magic kernel_server || failed=1
    echo "types: mypy"
    "$venv/bin/mypy" --strict mymps_magic kernel_server || failed=1
    return "$failed"
}

case "${1:-}" in
    demo)
        setup
        exec "$venv/bin/mymps" demo
        ;;
    lint)
        setup
        lint
        ;;
    test)
        shift
        setup
        lint
        system_packages
        export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
        # The slowest tests are listed at the end: the suite must stay under 15 minutes.
        exec "$venv/bin/python" -m pytest -q --durations=30 "$@"
        ;;
    *)
        echo "usage: scripts/dev.sh demo | lint | test [pytest args]" >&2
        exit 2
        ;;
esac
