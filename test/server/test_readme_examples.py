"""The user's three README examples run unchanged against the real server, and the user's test
script passes (against random tiny weights the ranking is not meaningful, so it is not required)."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from grpc_helpers import embed_documents, embed_query
from texts import DOCUMENTS, QUERY

from nvembed_triton.protocol.contract import PUBLIC_MODEL

pytestmark = pytest.mark.server  # starts real tritonservers

EXAMPLES = Path(__file__).parents[1] / "readme_examples"
TEST_SCRIPT = Path(__file__).parents[1] / "test-nv-embed-v2.py"


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
    """The example's printed ranking is the one the server's embeddings give, computed here."""
    output = run_example("semantic_search.py", nvembed_server.url)
    printed = [(float(score), text) for score, text in re.findall(r"\d+\. Score: (-?[0-9.]+) - (.*)\.\.\.", output)]
    with nvembed_server.client() as client:
        query = embed_query(client, PUBLIC_MODEL, QUERY)[0]
        scores = embed_documents(client, PUBLIC_MODEL, DOCUMENTS) @ query
    expected = [(float(scores[i]), DOCUMENTS[i][:80]) for i in np.argsort(-scores)]
    assert [text for _, text in printed] == [text for _, text in expected]
    assert [score for score, _ in printed] == pytest.approx([score for score, _ in expected], abs=1e-4)


def test_user_test_script_passes(nvembed_server):
    result = subprocess.run(
        [sys.executable, str(TEST_SCRIPT), "--url", nvembed_server.url, "--no-check-ranking"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed, 0 failed" in result.stdout
