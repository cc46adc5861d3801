#!/usr/bin/env bash
# Installs everything the test suite needs into .venv (and the browser for the viewer tests,
# when missing and we are root), then runs ruff (lint + format check) and the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# torch==2.13.0 is the CPU wheel on these machines; GPU users install their own torch first.
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.13.0 -e '.[test]'

# Debian packages the tests drive: the browser for the viewer tests, systemd-analyze for the unit.
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
command -v systemd-analyze >/dev/null || missing+=(systemd)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing Debian packages for the tests: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "warning: missing ${missing[*]} and cannot install them; those tests fail under CI=true" >&2
    fi
fi

.venv/bin/ruff check pn2v_live tests
.venv/bin/ruff format --check pn2v_live tests
exec .venv/bin/python -m pytest "$@"
