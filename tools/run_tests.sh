#!/usr/bin/env bash
# Set up and run the whole test suite: the README's test command, and what CI (.ci/run) runs.
#
# What it installs, in this order:
#   - Debian's chromium, only when neither `chromium` nor `chromium-browser` is on PATH (the
#     HTML report's tests render the page in headless Chromium); through apt-get, as root or
#     with sudo. Without apt-get it stops and says what to install.
#   - .venv: a virtual environment with torch==2.13.0 first (on these machines a CPU wheel
#     already on disk; a bare `torch` requirement would pull a CUDA build of several GB), then
#     graphopt itself, editable, with its dev and bench extras.
# Then it runs pytest; arguments are passed on (e.g. `bash tools/run_tests.sh tests/core -x`).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  if ! command -v apt-get >/dev/null; then
    echo "run_tests.sh: chromium is not installed and there is no apt-get to install it;" \
      "install Chromium (the HTML report's tests render the page in it), then rerun" >&2
    exit 1
  fi
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  echo "run_tests.sh: installing Debian's chromium (the HTML report's tests need it)"
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends chromium
fi

python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[dev,bench]'
.venv/bin/python -m pytest "$@"
