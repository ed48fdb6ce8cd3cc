"""The package's layer rules (pyproject.toml, [tool.importlinter]) hold, and they bite: import-linter
passes on the package as it is, and fails on copies with one forbidden import added."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
LAYERS = "Layers: testing, the launcher, the fronts beside the model"
NO_TORCH = "The light client, its fronts, the protocol and the settings never import torch"
NO_CYCLES = "No import cycles between the modules of a layer"


def lint_imports(source: Path, config_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(source)}  # ahead of the editable install's path
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=config_dir, env=env, capture_output=True, text=True, timeout=120)


def broken_contracts(output: str) -> set[str]:
    """The contracts lint-imports' summary reports BROKEN (a name may wrap over lines)."""
    flat = " ".join(output.split())
    broken = set()
    for name in (LAYERS, NO_TORCH, NO_CYCLES):
        after = flat.split(name, 1)[1]  # the summary names each contract first, then its verdict
        kept, failed = after.find(" KEPT"), after.find(" BROKEN")
        if failed != -1 and (kept == -1 or failed < kept):
            broken.add(name)
    return broken


def test_the_package_keeps_its_layer_rules():
    result = lint_imports(ROOT / "src", ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 3 kept, 0 broken." in result.stdout


@pytest.mark.parametrize(
    ("module", "added_import", "broken"),
    [
        ("client/embedding_client.py", "from nvembed_triton.engine import encoders", {LAYERS, NO_TORCH}),  # client pulls torch
        ("openai_api/app.py", "from nvembed_triton.model import lanes", {LAYERS}),  # a front beside the model uses it
        ("settings.py", "from nvembed_triton.protocol import contract", {LAYERS}),  # settings and protocol stay apart
        ("protocol/contract.py", "from nvembed_triton.launcher import server", {LAYERS, NO_CYCLES}),  # up: a cycle too
        ("engine/text_encoder.py", "from nvembed_triton.engine import encoders", {NO_CYCLES}),  # encoders imports it back
    ],
)
def test_a_forbidden_import_fails_the_check(tmp_path, module, added_import, broken):
    shutil.copytree(ROOT / "src" / "nvembed_triton", tmp_path / "src" / "nvembed_triton")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "src" / "nvembed_triton" / module
    target.write_text(target.read_text() + f"\n{added_import}  # noqa\n")
    result = lint_imports(tmp_path / "src", tmp_path)
    assert result.returncode != 0, result.stdout
    assert broken_contracts(result.stdout) == broken, result.stdout
