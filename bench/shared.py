"""What the benchmarks share: texts and document lengths, request tensors, a closed-loop load,
the tiny checkpoint, result files; and SIGTERM, which ends a benchmark through its `finally`
blocks (Python's default would leave the servers it started running, their launchers orphaned
and still self-healing)."""

from __future__ import annotations

import asyncio
import json
import math
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from nvembed_triton.protocol import contract
from nvembed_triton.protocol.contract import PUBLIC_MODEL

signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))

# Each common word here is one token in the Mistral vocabulary (plus BOS/EOS added later).
WORDS = "the model learns patterns from examples while markets set prices by supply and demand".split()


def log_uniform_lengths(rng: random.Random, count: int, low: int = 16, high: int = 2048) -> list[int]:
    """Log-uniform between 16 and 2048 tokens: short texts are common, long ones rare but costly,
    so padding and packing matter as in real corpora."""
    return [int(math.exp(rng.uniform(math.log(low), math.log(high)))) for _ in range(count)]


def write_json(result: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path}")


def model_dir_or_tiny(model_dir: str | None, scratch: Path, **tiny_sizes) -> Path:
    """--model-dir, else a tiny random NV-Embed-v2 generated into scratch."""
    if model_dir:
        return Path(model_dir)
    from nvembed_triton.testing.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(scratch / "tiny", **tiny_sizes)


def text_of_tokens(rng: random.Random, tokens: int) -> str:
    # Each common word here is one token in the Mistral vocabulary (plus BOS/EOS added later).
    return " ".join(rng.choice(WORDS) for _ in range(tokens))


def request_inputs(name: str, texts: list[str]) -> list[grpcclient.InferInput]:
    shape = [1] if name == contract.QUERY_INPUT else [1, len(texts)]
    tensor = grpcclient.InferInput(name, shape, "BYTES")
    tensor.set_data_from_numpy(np.array(texts, dtype=object).reshape(shape))
    return [tensor]


def token_counts_of(model_dir: Path, texts: set[str]) -> dict[str, int]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return {t: len(tokenizer.encode(t + "</s>").ids) for t in texts}


def run_load(url: str, requests: list[tuple[str, list[str]]], clients: int, token_counts: dict[str, int]) -> dict:
    """`clients` concurrent callers on one asyncio gRPC channel (threads would measure the GIL of
    this 2-core machine, not the server), each sending its next request when the last returns."""
    return asyncio.run(_run_load(url, requests, clients, token_counts))


async def _run_load(url, requests, clients, token_counts) -> dict:
    from tritonclient.grpc import aio

    pending = iter(requests)
    latencies: list[float] = []

    async def caller(client) -> None:
        for name, texts in pending:  # the shared iterator hands each request to one caller
            started = time.perf_counter()
            await client.infer(PUBLIC_MODEL, request_inputs(name, texts))
            latencies.append(time.perf_counter() - started)

    async with aio.InferenceServerClient(url) as client:
        started = time.perf_counter()
        await asyncio.gather(*(caller(client) for _ in range(clients)))
        wall = time.perf_counter() - started
    texts = [t for _, ts in requests for t in ts]
    ms = np.array(latencies) * 1000
    return {
        "clients": clients,
        "requests_per_s": len(requests) / wall,
        "documents_per_s": len(texts) / wall,
        "tokens_per_s": sum(token_counts[t] for t in texts) / wall,
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
    }
