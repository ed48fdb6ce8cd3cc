#!/usr/bin/env bash
# Run the whole test suite: unit tests and tests against real tritonservers started on free ports.
# Sets up ./.venv first (quick when it is already there). Extra arguments go to pytest.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
./setup.sh
exec .venv/bin/python -m pytest test "$@"
