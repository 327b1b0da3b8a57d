#!/usr/bin/env bash
# Debian's Chromium for the browser tests (tests/host/test_browser.py, tools/screenshot_workflow.py). Playwright's
# Python package, which drives it, comes with the venv (tools/requirements-dev.txt); `playwright install` is never run:
# no browser is downloaded. Idempotent: nothing to do when chromium is on PATH.
set -euo pipefail
log() { echo "[setup_browser] $*" >&2; }
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  log "ERROR: chromium is not installed, and installing it needs root and apt-get."
  log "Install Debian's package yourself (sudo apt-get install chromium), then run make test again."
  exit 1
fi
log "installing Debian's chromium with apt-get (once)"
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
    >/tmp/esd-setup-browser.log 2>&1; then
  tail -20 /tmp/esd-setup-browser.log >&2
  log "ERROR: apt-get could not install chromium (log above: /tmp/esd-setup-browser.log)"
  exit 1
fi
command -v chromium >/dev/null 2>&1 || { log "ERROR: chromium still not on PATH after installing it"; exit 1; }
log "$(chromium --version 2>/dev/null | head -1)"
