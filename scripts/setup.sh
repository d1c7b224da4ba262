#!/usr/bin/env bash
# Installs lowbit and its test dependencies on a fresh machine (CPU torch from the local wheel cache when
# present; the prose corpus used by tests and benchmarks comes from Debian's python3.11-doc).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>/dev/null \
  || python -m pip install -q --disable-pip-version-check "torch>=2.4"
python -m pip install -q --disable-pip-version-check -e ".[serve,test]"
if [ ! -d /usr/share/doc/python3.11/html/_sources ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq python3.11-doc) >/dev/null 2>&1 \
    || echo "setup: python3.11-doc not installed (tests fall back to the repo's own text)" >&2
fi
# The chat page test drives Debian's Chromium through Playwright (no browser download: it runs /usr/bin/chromium).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
    || echo "setup: chromium not installed (tests/server/test_page.py needs /usr/bin/chromium)" >&2
fi
