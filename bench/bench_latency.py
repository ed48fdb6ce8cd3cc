"""Where a lone query's time goes, stage by stage: serve.sh --demo (all-MiniLM-L6-v2 on the CPU,
or --model-dir) with Triton's own tracing on (every request, level TIMESTAMPS), single queries
sent one after another over gRPC as the seed's client sends them (asking for
`embeddings` alone), each paired with the same text through the same encoder in-process
(NVEmbedEncoder / the sentence-transformers encoder, encode() of one text, in this process) just
before or after it: the two never run at once, and each pair meets the same moment of this shared
machine.

    .venv/bin/python bench/bench_latency.py [--queries 300] [--rounds 3] [--model-dir DIR] [--json PATH]

Two kinds of request are kept apart: each public instance's first (a fresh server sends its first
`instances` queries to a different instance each) and the steady ones after a warm-up. The stages,
from Triton's timestamps (ms, medians over the steady queries, each round; then the median round):
  client + gRPC         the client's own time minus what the server saw from reading the request
                        to sending the response (tritonclient, the loopback, gRPC framing)
  into the public model reading the request to its instance's execute() (Triton's queue)
  both models           from the public instance's execute() to its response reaching tritonserver:
                        the hand-off to an answering thread, reading and checking, the BLS request
                        to the encoder, its queue, hand-off to a lane, encode(), and the way back.
                        Triton traces only the public request: a BLS request whose parent's
                        execute() has returned cannot carry its trace (the public model's model.py)
  response out          tritonserver sending the response
`both models` minus the in-process encode() is what the two stubs add around the model; the last
row, each round's client p50 minus its in-process p50 (the median of rounds), is what the server
adds in all. Run nothing else meanwhile: this 2-core machine is noisy.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from bench_server import request_inputs, text_of_tokens
from shared import write_json

from nvembed_triton.engine.encoders import load_encoder
from nvembed_triton.protocol.contract import EMBEDDINGS_OUTPUT, QUERY_INPUT
from nvembed_triton.protocol.options import TextOptions
from nvembed_triton.protocol.settings import EncoderSettings
from nvembed_triton.serving.serve import parser as serve_parser
from nvembed_triton.serving.serve import plan, server_settings
from nvembed_triton.serving.server import TritonServer, free_port

STAGES = {  # name -> (from, to): timestamps of the public request's trace
    "into the public model": ("GRPC_WAITREAD_END", "COMPUTE_START"),
    "both models": ("COMPUTE_START", "INFER_RESPONSE_COMPLETE"),
    "response out": ("INFER_RESPONSE_COMPLETE", "GRPC_SEND_END"),
}


def read_traces(trace_file: Path) -> list[dict[str, int]]:
    """The public requests' traces ({timestamp: ns}), in arrival order (the encoder's are not traced)."""
    public, stamps = set(), collections.defaultdict(dict)
    for path in trace_file.parent.glob(trace_file.name + "*"):
        for entry in json.loads(path.read_text() or "[]"):
            if "model_name" in entry and not entry["model_name"].endswith("-encoder"):
                public.add(entry["id"])
            for stamp in entry.get("timestamps", []):
                stamps[entry["id"]][stamp["name"]] = stamp["ns"]
    requests = [stamps[i] for i in public if "GRPC_SEND_END" in stamps[i]]
    return sorted(requests, key=lambda r: r["REQUEST_START"])


def traces_of(trace_file: Path, count: int, timeout_s: float = 10.0) -> list[dict[str, int]]:
    """The first `count` requests' traces, once Triton has written them (it writes each trace as
    the request is released, which can come just after the client has its answer)."""
    deadline = time.monotonic() + timeout_s
    while len(traces := read_traces(trace_file)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(traces) == count, f"{len(traces)} traced requests, expected {count}"
    return traces


def stage_ms(trace: dict[str, int], client_ms: float) -> dict[str, float]:
    stages = {name: (trace[b] - trace[a]) / 1e6 for name, (a, b) in STAGES.items()}
    server_ms = (trace["GRPC_SEND_END"] - trace["GRPC_WAITREAD_END"]) / 1e6
    return {"client + gRPC": client_ms - server_ms, **stages, "total (client)": client_ms}


def lone_queries(url: str, model: str, texts: list[str], encoder=None) -> tuple[list[float], list[float]]:
    """Client ms of each text sent alone, one after another; with `encoder`, also ms of each text
    through encoder.encode() in this process, just before or just after its query (alternately), so
    both sides of a pair meet the same moment of this shared machine, each while the other idles."""
    client_ms, local_ms = [], []
    outputs = [grpcclient.InferRequestedOutput(EMBEDDINGS_OUTPUT)]  # as the seed's client asks
    with grpcclient.InferenceServerClient(url) as client:
        for i, text in enumerate(texts):
            for local in (False, True) if i % 2 == 0 else (True, False):
                if local and encoder is None:
                    continue
                started = time.perf_counter()
                if local:
                    encoder.encode([text], [TextOptions()])
                else:
                    result = client.infer(model, request_inputs(QUERY_INPUT, [text]), outputs=outputs)
                    assert np.isfinite(result.as_numpy(EMBEDDINGS_OUTPUT)).all()
                (local_ms if local else client_ms).append((time.perf_counter() - started) * 1e3)
    return client_ms, local_ms


def summary(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """p50 and p90 of each stage."""
    out = {}
    for name in rows[0]:
        ordered = sorted(row[name] for row in rows)
        out[name] = {"p50": statistics.median(ordered), "p90": ordered[int(0.9 * (len(ordered) - 1))]}
    return out


def through_server(args, scratch: Path, texts: list[list[str]]) -> tuple[dict, str, int]:
    """The first requests, a warm-up, then the rounds: each text through the server and through
    the same encoder in this process (loaded once the server is up), pair by pair."""
    plan_ = plan(
        serve_parser().parse_args(["--demo"] if args.model_dir is None else ["--model-dir", args.model_dir, "--device", "cpu"])
    )
    environ = {**os.environ, "TRITON_HOST": "127.0.0.1"}
    environ.update({name: str(free_port()) for name in ("TRITON_GRPC_PORT", "TRITON_HTTP_PORT", "TRITON_METRICS_PORT")})
    trace_file = scratch / "trace" / "trace.json"
    trace_file.parent.mkdir(parents=True)
    settings = dataclasses.replace(server_settings(plan_, scratch / "run", environ), trace_file=trace_file)
    results = {"rounds": [], "in-process encode p50 ms": []}
    with TritonServer(settings) as server:
        encoder = in_process_encoder(str(plan_.model_dir), texts[0][:50])
        instances = server.expected_stubs() - 1  # the public model's; one encoder
        url = settings.grpc_url
        first, _ = lone_queries(url, plan_.name, texts[0][:instances])
        first_traces = traces_of(trace_file, instances)
        results["first request of each public instance"] = summary(
            [stage_ms(t, c) for t, c in zip(first_traces, first, strict=True)]
        )
        seen = max(3 * instances, 100)  # past every instance's first requests
        lone_queries(url, plan_.name, texts[0][instances:seen], encoder)  # warm-up
        for round_texts in texts[1:]:
            client, local = lone_queries(url, plan_.name, round_texts, encoder)
            traces = traces_of(trace_file, seen + len(round_texts))[seen:]
            seen += len(round_texts)
            results["rounds"].append(summary([stage_ms(t, c) for t, c in zip(traces, client, strict=True)]))
            results["in-process encode p50 ms"].append(statistics.median(local))
            print(
                f"round {len(results['rounds'])}: p50 {results['rounds'][-1]['total (client)']['p50']:.2f} ms, "
                f"in-process {results['in-process encode p50 ms'][-1]:.2f} ms",
                file=sys.stderr,
            )
        server.kill()  # measured: no need to wait for Triton to unload its instances one by one
    return results, str(plan_.model_dir), instances


def in_process_encoder(model_dir: str, warm_up: list[str]):
    """The server's encoder with its settings on the CPU, in this process, warmed up."""
    encoder = load_encoder(EncoderSettings.from_parameters({"model_dir": model_dir, "device": "cpu"}))
    for text in warm_up:
        encoder.encode([text], [TextOptions()])
    return encoder


def table(results: dict) -> str:
    rounds = results["rounds"]
    names = list(rounds[0])
    lines = [
        "| stage | first request of an instance, p50 | steady p50 (median of rounds) | rounds' p50 | steady p90 |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        p50s = [r[name]["p50"] for r in rounds]
        lines.append(
            f"| {name} | {results['first request of each public instance'][name]['p50']:.2f} | **{statistics.median(p50s):.2f}** "
            f"| {' / '.join(f'{v:.2f}' for v in p50s)} | {statistics.median(r[name]['p90'] for r in rounds):.2f} |"
        )
    encode = results["in-process encode p50 ms"]
    gaps = [r["total (client)"]["p50"] - e for r, e in zip(rounds, encode, strict=True)]
    for name, values in (("in-process encode() of the same texts", encode), ("**through the server minus in-process**", gaps)):
        lines.append(f"| {name} | | **{statistics.median(values):.2f}** | {' / '.join(f'{v:.2f}' for v in values)} | |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=300, help="lone queries per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model-dir", help="serve this checkpoint on the CPU instead of the demo model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="bench/results/latency.json")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    # Round 0 feeds the first requests and the warm-up; each round's texts differ (no cache helps).
    texts = [[text_of_tokens(rng, rng.randint(6, 24)) for _ in range(max(args.queries, 200))] for _ in range(args.rounds + 1)]
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as scratch:
        results, model_dir, instances = through_server(args, Path(scratch), texts)
    results["setup"] = {"model_dir": model_dir, "public instances": instances, "queries": args.queries, "cpus": os.cpu_count()}
    write_json(results, args.json)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
