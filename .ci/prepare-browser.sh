#!/usr/bin/env bash
# The headless browser that tests/test_ui.py drives: Debian's chromium (playwright's own download is not used).
# Idempotent: does nothing where chromium is already installed.
set -euo pipefail
command -v chromium >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium)
