#!/usr/bin/env bash
# Newcomer's first command: set up ./.venv, serve the small all-MiniLM-L6-v2 model through the same
# Triton stack on the CPU (no GPU, no 16 GB download), run the user's three tests against it.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$here/setup.sh"
exec "$here/.venv/bin/python" "$here/tools/demo.py" "$@"  # e.g. --grpc-port 9001 where 8001 is taken
