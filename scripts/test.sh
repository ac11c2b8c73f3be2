#!/usr/bin/env bash
# Install everything the test suite needs (Python package + dev extras, Debian's chromium for the
# browser tests) and run the tests. Used by the README and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False PIP_DISABLE_PIP_VERSION_CHECK=1
# on a shared 2-core machine OpenMP busy-waiting makes torch several times slower (see bench/README.md)
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
if ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: could not install chromium; browser tests will be skipped" >&2
  fi
fi
python -m pip install -q -e ".[dev]"
# Every test runs, `slow` ones included (a developer skips them with: bash scripts/test.sh -m "not slow");
# `weights` tests (real checkpoints) never run in CI, `gpu` tests skip themselves without CUDA (tests/conftest.py).
python -m pytest -q -p no:cacheprovider "$@"
