#!/usr/bin/env bash
# Create ./.venv with everything needed to serve, test and run the demo. Safe to re-run.
# torch: a torch already in the venv is kept; otherwise the pinned release is installed. Where no
# NVIDIA driver is present, PyTorch's CPU build (PyPI's Linux build carries ~3 GB of CUDA
# libraries a CPU cannot use); otherwise PyPI's. TORCH_INDEX_URL picks another build, e.g.
# https://download.pytorch.org/whl/cu126 for an older driver.
# NVEMBED_SETUP_SHOW_TORCH=1 only prints the pip arguments chosen for torch (for tests).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
python="${PYTHON:-python3}"
torch_pin="torch==2.13.0"  # as pyproject.toml's engine extra
nvidia_driver="${NVIDIA_DRIVER_VERSION_FILE:-/proc/driver/nvidia/version}"  # present wherever the driver is loaded

torch_arguments() {
  if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    echo "$torch_pin --index-url $TORCH_INDEX_URL"
  elif [[ -e "$nvidia_driver" ]]; then
    echo "$torch_pin"
  else
    # An extra index: if it cannot be reached, pip goes on with PyPI's build after one try.
    echo "$torch_pin --extra-index-url https://download.pytorch.org/whl/cpu --retries 1 --timeout 15"
  fi
}

if [[ -n "${NVEMBED_SETUP_SHOW_TORCH:-}" ]]; then
  torch_arguments
  exit 0
fi
[[ -x .venv/bin/python ]] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # shellcheck disable=SC2046  # the arguments are words on purpose
  .venv/bin/python -m pip install --quiet $(torch_arguments)
fi
.venv/bin/python -m pip install --quiet -e ".[test,bench]"
# checkov (deploy/kubernetes' policy scan in the tests) in a venv of its own: its pins would
# downgrade packages torch relies on.
[[ -x .venv/checkov/bin/checkov ]] || { "$python" -m venv .venv/checkov && .venv/checkov/bin/python -m pip install --quiet "checkov==3.3.30"; }
echo "setup.sh: ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
