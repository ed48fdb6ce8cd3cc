"""The user's three README examples run unchanged against the real server, and the user's test
script passes (against random tiny weights the ranking is not meaningful, so it is not required)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent / "readme_examples"
TEST_SCRIPT = Path(__file__).parent / "test-nv-embed-v2.py"


def run_example(name: str, url: str) -> str:
    code = (EXAMPLES / name).read_text(encoding="utf-8").replace("localhost:8001", url)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def norms(output: str) -> list[float]:
    return [float(value) for value in re.findall(r"norm: ([0-9.]+)", output)]


def test_query_example(nvembed_server):
    output = run_example("query_embedding.py", nvembed_server.url)
    assert "Query embedding shape: (1, 64)" in output
    assert norms(output) == pytest.approx([1.0], abs=1e-5)


def test_document_example(nvembed_server):
    output = run_example("document_embeddings.py", nvembed_server.url)
    assert "Document embeddings shape: (3, 64)" in output and "Number of embeddings: 3" in output
    assert norms(output) == pytest.approx([1.0] * 3, abs=1e-5)


def test_semantic_search_example(nvembed_server):
    output = run_example("semantic_search.py", nvembed_server.url)
    scores = [float(s) for s in re.findall(r"Score: (-?[0-9.]+)", output)]
    assert len(scores) == 4 and scores == sorted(scores, reverse=True)
    assert all(-1 <= s <= 1 for s in scores)


def test_user_test_script_passes(nvembed_server):
    result = subprocess.run(
        [sys.executable, str(TEST_SCRIPT), "--url", nvembed_server.url, "--no-check-ranking"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed, 0 failed" in result.stdout
