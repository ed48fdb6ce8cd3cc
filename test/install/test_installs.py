"""Installs that fit each user: the base package is the light client (no torch) and says which
extra serving needs; setup.sh picks PyTorch's CPU build where no NVIDIA driver is present (its
index is not reachable from these machines, so the choice is tested, not the download)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
from grpc_helpers import cosine, embed_documents

ROOT = Path(__file__).resolve().parents[2]
LIGHT_INSTALL_MAX_MB = 250  # grpcio, protobuf and numpy are most of it (161 MB measured, pip included)
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def torch_choice(**environment: str) -> str:
    """The pip arguments setup.sh would install torch with, in this environment."""
    env = {key: value for key, value in os.environ.items() if key != "TORCH_INDEX_URL"}
    env.update(environment, NVEMBED_SETUP_SHOW_TORCH="1")
    result = subprocess.run([str(ROOT / "setup.sh")], env=env, capture_output=True, text=True, timeout=30, check=True)
    return result.stdout.strip()


def test_setup_picks_the_cpu_build_of_the_pinned_torch_without_an_nvidia_driver(tmp_path):
    engine = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["engine"]
    pin = next(requirement for requirement in engine if requirement.startswith("torch"))
    no_driver = torch_choice(NVIDIA_DRIVER_VERSION_FILE=str(tmp_path / "absent"))
    driver = tmp_path / "version"
    driver.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.65.06\n")
    with_driver = torch_choice(NVIDIA_DRIVER_VERSION_FILE=str(driver))
    chosen = torch_choice(NVIDIA_DRIVER_VERSION_FILE=str(driver), TORCH_INDEX_URL="https://example.invalid/whl/cu126")
    assert no_driver.split()[0] == with_driver.split()[0] == chosen.split()[0] == pin
    assert f"--extra-index-url {CPU_INDEX}" in no_driver  # the CPU build wins where its index answers
    assert "index-url" not in with_driver  # PyPI's build, with CUDA
    assert "--index-url https://example.invalid/whl/cu126" in chosen


@pytest.fixture(scope="module")
def light_venv(tmp_path_factory) -> Path:
    """`pip install <checkout>` (no extras) into a fresh virtual environment."""
    venv = tmp_path_factory.mktemp("light") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(ROOT)], check=True, timeout=900)
    return venv


def megabytes(folder: Path) -> float:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and not path.is_symlink()) / 2**20


@pytest.mark.install
def test_the_light_install_embeds_without_torch(light_venv, nvembed_server):
    """The client alone: it embeds through a real server, imports no torch, and weighs little."""
    python = str(light_venv / "bin" / "python")
    code = (
        "import sys, numpy as np\n"
        "from nvembed_triton.client import EmbeddingClient\n"
        f"with EmbeddingClient('{nvembed_server.url}') as client: vectors = client.encode(['light', 'client'])\n"
        "assert 'torch' not in sys.modules\n"
        "np.save(sys.argv[1], vectors)\n"
    )
    out = light_venv.parent / "vectors.npy"
    subprocess.run([python, "-c", code, str(out)], check=True, timeout=120)
    with nvembed_server.client() as client:
        expected = embed_documents(client, "nv-embed-v2", ["light", "client"])
    assert np.all(cosine(np.load(out), expected) >= 0.99999)
    assert subprocess.run([python, "-c", "import torch"], capture_output=True).returncode != 0
    size = megabytes(light_venv)
    print(f"light install: {size:.0f} MB")
    assert size < LIGHT_INSTALL_MAX_MB


@pytest.mark.install
def test_the_light_install_says_which_extra_serving_needs(light_venv, tmp_path):
    serve = str(light_venv / "bin" / "nvembed-triton-serve")
    helped = subprocess.run([serve, "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: nvembed-triton-serve")
    started = time.monotonic()
    refused = subprocess.run([serve, "--device", "cpu", "--model-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and time.monotonic() - started < 20
    assert "pip install 'nvembed-triton[server]'" in refused.stderr and "torch" in refused.stderr
    corpus = subprocess.run([str(light_venv / "bin" / "nvembed-triton-embed-corpus"), "--help"], capture_output=True, text=True)
    assert corpus.returncode == 1 and "pip install 'nvembed-triton[corpus]'" in corpus.stderr
    # the README's line for the corpus user, from the checkout
    pip = [str(light_venv / "bin" / "python"), "-m", "pip", "install", "--quiet", f"{ROOT}[corpus]"]
    subprocess.run(pip, check=True, timeout=900)
    corpus = subprocess.run([str(light_venv / "bin" / "nvembed-triton-embed-corpus"), "--help"], capture_output=True, text=True)
    assert corpus.returncode == 0 and "--text-field" in corpus.stdout and "--truncate" in corpus.stdout
