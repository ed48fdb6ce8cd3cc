"""The bulk corpus embedder against the server's own best on the same corpus, side by side:

    .venv/bin/python bench/bench_corpus.py [--documents 4000] [--repeats 3] [--model-dir DIR]

One server (serve.sh, CPU; the tiny random NV-Embed-v2 unless --model-dir). A corpus of log-uniform
16..512-token documents written as Parquet. Alternating rounds of:
- server best: raw asyncio tritonclient sending the corpus as requests of 32 documents from
  8, 16 and 32 concurrent callers (bench_server.run_load), the fastest kept;
- embedder: `nvembed-triton-embed-corpus` (a subprocess, defaults: 16 requests of 32 in flight)
  on the same corpus, reading Parquet and writing shards and the manifest, timed from start to
  exit; its CPU time per document from the child's rusage.
Prints documents/s, tokens/s, the embedder / best ratio per round and their medians (target >=
0.9), and the embedder's CPU per document. This 2-core machine runs client and server on the same
cores, so the client's CPU is taken from the server: that is in the ratio.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from shared import log_uniform_lengths, model_dir_or_tiny, run_load, text_of_tokens, token_counts_of, write_json

from nvembed_triton.launcher.serve import parser as serve_parser
from nvembed_triton.launcher.serve import plan, server_settings
from nvembed_triton.launcher.server import TritonServer, free_port
from nvembed_triton.protocol import contract

CALLERS = (8, 16, 32)
DOCS_PER_REQUEST = 32


def server_best(url: str, texts: list[str], counts: dict[str, int]) -> dict:
    """The fastest of CALLERS, with this process's CPU time per document (the raw client's cost)."""
    requests = [(contract.DOCUMENTS_INPUT, texts[i : i + DOCS_PER_REQUEST]) for i in range(0, len(texts), DOCS_PER_REQUEST)]
    rows = []
    for callers in CALLERS:
        started = time.process_time()
        row = run_load(url, requests, callers, counts)
        rows.append({**row, "cpu_ms_per_document": (time.process_time() - started) / len(texts) * 1e3})
    return max(rows, key=lambda row: row["documents_per_s"])


def embedder(url: str, corpus: Path, output_dir: Path, tokens: int, documents: int, extra: list[str]) -> dict:
    shutil.rmtree(output_dir, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    command = [sys.executable, "-m", "nvembed_triton.corpus.cli", str(corpus), str(output_dir), "--url", url,
               "--text-field", "text", "--id-field", "id", "--no-progress", *extra]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"documents_per_s": documents / wall, "tokens_per_s": tokens / wall, "cpu_ms_per_document": cpu / documents * 1e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model-dir")
    parser.add_argument("--embedder-args", default="", help="more flags for the embedder, e.g. '--concurrency 32'")
    parser.add_argument("--json", default="bench/results/corpus.json")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="nvembed-bench-corpus-"))
    model_dir = model_dir_or_tiny(args.model_dir, scratch)
    rng = random.Random(0)
    texts = [text_of_tokens(rng, n) for n in log_uniform_lengths(rng, args.documents, 16, 512)]
    corpus = scratch / "corpus.parquet"
    pq.write_table(pa.table({"id": [f"doc-{i}" for i in range(len(texts))], "text": texts}), corpus)
    counts = token_counts_of(model_dir, set(texts))
    tokens = sum(counts[t] for t in texts)
    environ = {**os.environ, "TRITON_GRPC_PORT": str(free_port()), "TRITON_HTTP_PORT": str(free_port()),
               "TRITON_METRICS_PORT": str(free_port())}  # fmt: skip
    plan_ = plan(serve_parser().parse_args(["--model-dir", str(model_dir), "--device", "cpu"]), environ)
    rounds = []
    with TritonServer(server_settings(plan_, scratch / "run", environ)) as server:
        url = server.settings.grpc_url
        server_best(url, texts[:256], counts)  # warm-up
        for repeat in range(args.repeats):
            best = server_best(url, texts, counts)
            ours = embedder(url, corpus, scratch / "out", tokens, len(texts), args.embedder_args.split())
            rounds.append({"server_best": best, "embedder": ours, "ratio": ours["documents_per_s"] / best["documents_per_s"]})
            print(f"round {repeat + 1}: server best {best['documents_per_s']:.0f} documents/s ({best['clients']} callers), "
                  f"embedder {ours['documents_per_s']:.0f} ({ours['cpu_ms_per_document']:.2f} ms CPU per document): "
                  f"{rounds[-1]['ratio']:.2f}x", flush=True)  # fmt: skip
    median = {
        "server_best_documents_per_s": statistics.median(r["server_best"]["documents_per_s"] for r in rounds),
        "embedder_documents_per_s": statistics.median(r["embedder"]["documents_per_s"] for r in rounds),
        "embedder_tokens_per_s": statistics.median(r["embedder"]["tokens_per_s"] for r in rounds),
        "server_best_tokens_per_s": statistics.median(r["server_best"]["tokens_per_s"] for r in rounds),
        "ratio": statistics.median(r["ratio"] for r in rounds),
        "embedder_cpu_ms_per_document": statistics.median(r["embedder"]["cpu_ms_per_document"] for r in rounds),
        "raw_client_cpu_ms_per_document": statistics.median(r["server_best"]["cpu_ms_per_document"] for r in rounds),
    }
    print(f"\ndocuments: {len(texts)}, tokens: {tokens}; medians of {args.repeats} rounds:")
    print("| | documents/s | tokens/s |\n|---|---|---|")
    for label, key in (("server best (raw tritonclient)", "server_best"), ("nvembed-triton-embed-corpus", "embedder")):
        print(f"| {label} | {median[f'{key}_documents_per_s']:.0f} | {median[f'{key}_tokens_per_s']:.0f} |")
    cpu = median["embedder_cpu_ms_per_document"]
    raw = median["raw_client_cpu_ms_per_document"]
    print(f"embedder / server best: {median['ratio']:.2f}x; client CPU per document: embedder {cpu:.2f} ms, raw {raw:.2f} ms")
    write_json({"rounds": rounds, "median": median, "documents": len(texts), "tokens": tokens}, args.json)
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
