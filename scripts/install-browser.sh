#!/usr/bin/env bash
# Install headless Chromium + chromedriver (Debian packages) for the web-UI test
# (tests/test_serving_browser.py) and selenium into the project's virtualenv. Idempotent:
# does nothing that is already done. Needs root (or sudo) for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  echo "install-browser: chromium and chromedriver already installed"
else
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver
fi

PY="${PYTHON:-.venv/bin/python}"
if [ -x "$PY" ]; then
  if "$PY" -c "import selenium" 2>/dev/null; then
    echo "install-browser: selenium already installed"
  else
    "$PY" -m pip install -q "selenium>=4.20"
  fi
fi
chromium --version 2>/dev/null || true
