"""docs/clients.md's Python examples run as written, in order in one process (a later block uses
what an earlier one made), against a real server: the tiny NV-Embed-v2 served as `nv-embed-v2`,
its addresses put where the page writes localhost. The README's own examples run in
test_newcomer.py; the pages' shell commands are checked in test/unit/test_documented_commands.py.
The Python on other pages needs S3 or a Kubernetes cluster (corpus.md's Ray pipeline,
deployment.md's in-cluster address) and is not run here."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.server

PAGE = ROOT / "docs" / "clients.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def test_the_client_examples_run_against_a_server(nvembed_server):
    blocks = python_blocks(PAGE.read_text(encoding="utf-8"))
    assert len(blocks) == 5  # the raw call, options and usage, the Python client, LangChain, OpenAI's clients
    code = "\n".join(blocks)
    code = code.replace("localhost:8001", nvembed_server.url).replace("localhost:8080", f"127.0.0.1:{nvembed_server.openai_port}")
    code += (  # what the blocks made, for the assertions below
        "\nprint('shapes', embeddings.shape if hasattr(embeddings, 'shape') else None, passages.shape, query.shape)"
        "\nprint('vectors', len(vectors), len(vectors[0]))"
        "\nprint('usage', result.as_numpy('token_counts').tolist(), result.as_numpy('truncated').tolist())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "shapes" in done.stdout and "(2, 64) (64,)" in done.stdout  # the tiny checkpoint's 64 dimensions
    assert "vectors 2 64" in done.stdout
    counts = re.search(r"usage \[(\d+), (\d+)\] \[(False|True), (False|True)\]", done.stdout)
    assert counts and all(int(count) > 1 for count in counts.group(1, 2)), done.stdout
