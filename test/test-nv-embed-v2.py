#!/usr/bin/env python3
"""The three checks of the model's README against a running server: query embedding, document
embeddings, semantic similarity search. Runs all three, prints PASS or FAIL for each, and exits
with 1 if any failed.

    .venv/bin/python test/test-nv-embed-v2.py [--url localhost:8001] [--model nv-embed-v2] [--no-check-ranking]
"""

import argparse
import os
import sys
from pathlib import Path

try:
    import numpy as np
    import tritonclient.grpc as grpcclient
except ImportError as missing:
    # Run with a Python that lacks tritonclient (`python test/...`): use the checkout's .venv
    # (setup.sh) if there is one, else say what to install.
    venv_python = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "python"
    if venv_python.is_file() and Path(sys.prefix).resolve() != venv_python.parents[1].resolve():
        os.execv(venv_python, [str(venv_python), *sys.argv])
    sys.exit(f"{missing}: run with .venv/bin/python (./setup.sh makes it), or pip install -r test/requirement.txt")

QUERY = "How do neural networks learn patterns from examples?"
DOCUMENTS = [
    "Neural networks learn through iterative training.",
    "Deep learning models adjust their weights through backpropagation.",
    "Market prices are determined by supply and demand.",
    "The recipe for chocolate chip cookies includes flour and sugar.",
]
RELEVANT = {0, 1}  # the two neural-network documents
NORM_TOLERANCE = 1e-5


def embed(client, model, name, texts, shape):
    tensor = grpcclient.InferInput(name, shape, "BYTES")
    tensor.set_data_from_numpy(np.array(texts, dtype=object))
    result = client.infer(model_name=model, inputs=[tensor], outputs=[grpcclient.InferRequestedOutput("embeddings")])
    return result.as_numpy("embeddings")


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def check_unit_rows(embeddings):
    norms = np.linalg.norm(embeddings, axis=1)
    check(np.all(np.abs(norms - 1) < NORM_TOLERANCE), f"embeddings are not L2-normalised: norms {norms}")


def test_query_embedding(client, model):
    embeddings = embed(client, model, "query", [QUERY], [1])
    check(embeddings.dtype == np.float32, f"expected FP32, got {embeddings.dtype}")
    check(embeddings.ndim == 2 and embeddings.shape[0] == 1, f"expected shape [1, dim], got {list(embeddings.shape)}")
    check_unit_rows(embeddings)
    print(f"query embedding: shape {list(embeddings.shape)}, norm {np.linalg.norm(embeddings):.6f}")
    return embeddings[0]


def test_document_embeddings(client, model):
    embeddings = embed(client, model, "documents", [DOCUMENTS], [1, len(DOCUMENTS)])
    check(embeddings.dtype == np.float32, f"expected FP32, got {embeddings.dtype}")
    check(embeddings.shape[0] == len(DOCUMENTS), f"expected {len(DOCUMENTS)} embeddings, got {embeddings.shape[0]}")
    check_unit_rows(embeddings)
    for i, norm in enumerate(np.linalg.norm(embeddings, axis=1), start=1):
        print(f"document {i} norm: {norm:.6f}")
    return embeddings


def test_semantic_search(client, model, check_ranking):
    query = test_query_embedding(client, model)
    documents = test_document_embeddings(client, model)
    check(query.shape[0] == documents.shape[1], "query and document embeddings differ in dimension")
    scores = documents @ query
    check(np.all(np.abs(scores) <= 1 + 1e-5), f"cosine scores outside [-1, 1]: {scores}")
    ranked = np.argsort(scores)[::-1]
    print("ranked documents (most relevant first):")
    for rank, index in enumerate(ranked, 1):
        print(f"{rank}. score {scores[index]:.4f} - {DOCUMENTS[index]}")
    if check_ranking:
        check(set(ranked[:2].tolist()) == RELEVANT, "the two neural-network documents should rank first")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="localhost:8001", help="Triton gRPC address")
    parser.add_argument("--model", default="nv-embed-v2", help="model name in Triton")
    parser.add_argument(
        "--no-check-ranking",
        dest="check_ranking",
        action="store_false",
        help="do not require the neural-network documents to rank first (for random test weights)",
    )
    args = parser.parse_args()
    client = grpcclient.InferenceServerClient(url=args.url)
    tests = [
        ("query embedding", lambda: test_query_embedding(client, args.model)),
        ("document embeddings", lambda: test_document_embeddings(client, args.model)),
        ("semantic similarity search", lambda: test_semantic_search(client, args.model, args.check_ranking)),
    ]
    failed = 0
    for number, (name, run) in enumerate(tests, 1):
        print(f"\n=== test {number}: {name} ===")
        try:
            run()
            print(f"PASS: {name}")
        except Exception as error:  # report every test, then fail
            failed += 1
            print(f"FAIL: {name}: {error}")
    print(f"\n{len(tests) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
