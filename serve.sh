#!/usr/bin/env bash
# Serve NV-Embed-v2 over gRPC with Triton: the Triton container's tritonserver when there is one,
# otherwise the one bundled in the nvidia-pytriton wheel. ./serve.sh --help lists every option.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# The Python that has the package: $PYTHON, else this checkout's .venv (setup.sh), else python3.
if [[ -n "${PYTHON:-}" ]]; then
  python="$PYTHON"
elif [[ -x "$here/.venv/bin/python" ]]; then
  python="$here/.venv/bin/python"
else
  python="$(command -v python3 || true)"
fi
if [[ -z "$python" ]] || ! "$python" -c "import nvembed_triton" 2>/dev/null; then
  echo "serve.sh: the nvembed_triton package is not installed for '${python:-python3}'." >&2
  echo "  On a plain machine run ./setup.sh; in the Triton container: pip install '$here'" >&2
  exit 1
fi


exec "$python" -m nvembed_triton.launcher.serve "$@"
