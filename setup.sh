#!/usr/bin/env bash
# Create ./.venv with everything needed to serve, test and run the demo. Safe to re-run.
# A torch already in the venv is kept; otherwise the pinned release is installed: PyPI's build
# (CUDA on Linux), or TORCH_INDEX_URL's (e.g. https://download.pytorch.org/whl/cpu on a CPU-only machine).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
python="${PYTHON:-python3}"
[[ -x .venv/bin/python ]] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # TORCH_INDEX_URL picks another build of the same release, e.g. PyTorch's CPU-only index.
  .venv/bin/python -m pip install --quiet "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
.venv/bin/python -m pip install --quiet -e ".[test,bench]"
# checkov (deploy/kubernetes' policy scan in the tests) in a venv of its own: its pins would
# downgrade packages torch relies on.
[[ -x .venv/checkov/bin/checkov ]] || { "$python" -m venv .venv/checkov && .venv/checkov/bin/python -m pip install --quiet "checkov==3.3.30"; }
echo "setup.sh: ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
