#!/usr/bin/env bash
# Run the whole test suite (unit + real API server + network namespaces) and print pytest's summary.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${WIREKUBE_CACHE:-$HOME/.cache/wirekube}"
export PATH="$PWD/.venv/bin:$CACHE/bin:$CACHE/tools:$PATH"
exec .venv/bin/python -m pytest -ra --durations=15 tests "$@"
