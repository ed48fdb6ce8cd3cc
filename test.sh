#!/usr/bin/env bash
# Run the whole test suite: unit tests and tests against real tritonservers started on free ports.
# Needs ./setup.sh first (it is quick when already done).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
exec .venv/bin/python -m pytest test "$@"
