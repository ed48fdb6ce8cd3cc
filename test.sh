#!/usr/bin/env bash
# Run the whole test suite: unit tests and tests against real tritonservers started on free ports.
# Sets up ./.venv first (quick when it is already there). Extra arguments go to pytest, e.g.
# ./test.sh test/unit -n 2 for the unit tests alone.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
./setup.sh
exec .venv/bin/python -m pytest "$@"  # testpaths (pyproject.toml): test/; or name test/unit, test/server, test/install
