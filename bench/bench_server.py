"""Throughput and latency through a real tritonserver, with cross-request batching on and off side
by side in one run (the encoder is reloaded with `dynamic_batching` removed for the "off" rows).

    .venv/bin/python bench/bench_server.py [--model-dir DIR] [--device cpu] [--json bench/results/server.json]

Without --model-dir a tiny random NV-Embed-v2 checkpoint is generated. Workloads (fixed seed):
  queries: single short queries (`query` [1]);
  mixed:   40% single queries, 60% `documents` requests of 1-8 documents of 16..2048 tokens.
Also: serial p50 latency of one short query through the public model vs the encoder called directly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from shared import log_uniform_lengths

from nvembed_triton.protocol import contract
from nvembed_triton.protocol.contract import PUBLIC_MODEL, encoder_model_name
from nvembed_triton.serving.server import ServerSettings, TritonServer, free_port

ENCODER = encoder_model_name(PUBLIC_MODEL)
CONCURRENCY = (1, 4, 16, 64)
WORDS = "the model learns patterns from examples while markets set prices by supply and demand".split()


def model_dir_or_tiny(model_dir: str | None, scratch: Path, **tiny_sizes) -> Path:
    """--model-dir, else a tiny random NV-Embed-v2 generated into scratch."""
    if model_dir:
        return Path(model_dir)
    from nvembed_triton.testing.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(scratch / "tiny", **tiny_sizes)


def text_of_tokens(rng: random.Random, tokens: int) -> str:
    # Each common word here is one token in the Mistral vocabulary (plus BOS/EOS added later).
    return " ".join(rng.choice(WORDS) for _ in range(tokens))


def workload(kind: str, requests: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(requests):
        if kind == "queries" or rng.random() < 0.4:
            out.append((contract.QUERY_INPUT, [text_of_tokens(rng, rng.randint(6, 24))]))
        else:
            lengths = log_uniform_lengths(rng, rng.randint(1, 8))
            out.append((contract.DOCUMENTS_INPUT, [text_of_tokens(rng, n) for n in lengths]))
    return out


def request_inputs(name: str, texts: list[str]) -> list[grpcclient.InferInput]:
    shape = [1] if name == contract.QUERY_INPUT else [1, len(texts)]
    tensor = grpcclient.InferInput(name, shape, "BYTES")
    tensor.set_data_from_numpy(np.array(texts, dtype=object).reshape(shape))
    return [tensor]


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


def median_row(rows: list[dict]) -> dict:
    """Cell-wise median over repeated runs: this machine is noisy."""
    return {key: statistics.median(row[key] for row in rows) for key in rows[0]}


def set_batching(client: grpcclient.InferenceServerClient, enabled: bool, original: dict) -> None:
    """Reload the encoder with or without its dynamic batcher (Triton's config override)."""
    config = dict(original)
    if not enabled:
        config.pop("dynamic_batching", None)
    client.load_model(ENCODER, config=json.dumps(config))
    while not client.is_model_ready(ENCODER):
        time.sleep(0.2)


def serial_latency_ms(url: str, model: str, inputs_factory, repeats: int) -> float:
    with grpcclient.InferenceServerClient(url) as client:
        for _ in range(10):  # warm up
            client.infer(model, inputs_factory())
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            client.infer(model, inputs_factory())
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def added_latency(url: str, repeats: int) -> dict:
    query = "How do neural networks learn?"

    def public():
        return request_inputs(contract.QUERY_INPUT, [query])

    def direct():
        text = grpcclient.InferInput(contract.TEXT_INPUT, [1, 1], "BYTES")
        text.set_data_from_numpy(np.array([[query]], dtype=object))
        prompt = grpcclient.InferInput(contract.PROMPT_NAME_INPUT, [1, 1], "BYTES")
        prompt.set_data_from_numpy(np.array([[contract.QUERY_PROMPT]], dtype=object))
        return [text, prompt]

    public_ms, direct_ms = serial_latency_ms(url, PUBLIC_MODEL, public, repeats), serial_latency_ms(url, ENCODER, direct, repeats)
    return {"public_p50_ms": public_ms, "encoder_direct_p50_ms": direct_ms, "added_p50_ms": public_ms - direct_ms}


def token_counts_of(model_dir: Path, texts: set[str]) -> dict[str, int]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return {t: len(tokenizer.encode(t + "</s>").ids) for t in texts}


def table(results: dict) -> str:
    lines = [
        "| workload | clients | req/s on | req/s off | ratio | docs/s on | tokens/s on | tokens/s off "
        "| p50 ms on | p95 ms on | p99 ms on | p50 ms off |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, rows in results["sweep"].items():
        for on, off in zip(rows["on"], rows["off"], strict=True):
            lines.append(
                f"| {kind} | {on['clients']} | {on['requests_per_s']:.1f} | {off['requests_per_s']:.1f} | "
                f"{on['requests_per_s'] / off['requests_per_s']:.2f}x | {on['documents_per_s']:.1f} | {on['tokens_per_s']:.0f} | "
                f"{off['tokens_per_s']:.0f} | {on['p50_ms']:.1f} | {on['p95_ms']:.1f} | {on['p99_ms']:.1f} | "
                f"{off['p50_ms']:.1f} |"
            )
    latency = results["added_latency"]
    lines.append(
        f"\nserial single query, p50: public {latency['public_p50_ms']:.2f} ms, encoder direct "
        f"{latency['encoder_direct_p50_ms']:.2f} ms, added by the public model {latency['added_p50_ms']:.2f} ms"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="NV-Embed-v2 snapshot (default: a generated tiny random one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of the generated checkpoint")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the generated checkpoint")
    parser.add_argument("--requests", type=int, default=192, help="requests per workload and setting")
    parser.add_argument("--latency-repeats", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="sweeps per setting; the table shows medians")
    parser.add_argument("--json", default="bench/results/server.json")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="nvembed-bench-"))
    model_dir = model_dir_or_tiny(args.model_dir, scratch, hidden=args.hidden, layers=args.layers)
    settings = ServerSettings(
        model_repository=Path(__file__).resolve().parents[1] / "model_repository",
        models=(PUBLIC_MODEL, ENCODER),
        run_dir=scratch / "run",
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        environment={"NVEMBED_MODEL_DIR": str(model_dir), "NVEMBED_DEVICE": args.device},
        allow_model_control=True,  # the benchmark reloads the encoder with batching off; loopback only
    )
    workloads = {kind: workload(kind, args.requests) for kind in ("queries", "mixed")}
    counts = token_counts_of(model_dir, {t for w in workloads.values() for _, ts in w for t in ts})
    results: dict = {"sweep": {kind: {"on": [], "off": []} for kind in workloads}}
    with TritonServer(settings) as server, grpcclient.InferenceServerClient(settings.grpc_url) as client:
        original = client.get_model_config(ENCODER, as_json=True)["config"]
        results["added_latency"] = added_latency(settings.grpc_url, args.latency_repeats)
        runs: dict = {kind: {mode: {c: [] for c in CONCURRENCY} for mode in ("on", "off")} for kind in workloads}
        for repeat in range(args.repeats):  # off and on alternate, so drifts in machine load hit both
            for mode in ("off", "on"):
                set_batching(client, mode == "on", original)
                for kind, requests in workloads.items():
                    run_load(settings.grpc_url, requests[:16], 4, counts)  # warm up
                    for clients in CONCURRENCY:
                        row = run_load(settings.grpc_url, requests, clients, counts)
                        runs[kind][mode][clients].append(row)
                        label = f"run {repeat + 1} batching {mode:3} {kind:7} clients {clients:2}"
                        print(f"{label}: {row['requests_per_s']:.1f} req/s", flush=True)
        for kind in workloads:
            for mode in ("on", "off"):
                results["sweep"][kind][mode] = [median_row(runs[kind][mode][c]) for c in CONCURRENCY]
        results["server_log_tail"] = server.log_tail(5)
    results["setup"] = {
        "model_dir": args.model_dir or f"generated: hidden {args.hidden}, {args.layers} layers",
        "device": args.device,
        "requests": args.requests,
        "repeats": args.repeats,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
