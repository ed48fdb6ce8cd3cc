"""Where a lone query's time goes, stage by stage: serve.sh --demo (all-MiniLM-L6-v2 on the CPU,
or --model-dir) with Triton's own tracing on (every request, level TIMESTAMPS; the public model
passes its trace to the encoder's request, so each query has two traces, parent and child),
single queries sent one after another over gRPC as the seed's client sends them (asking for
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
  public: check, forward the public stub from execute() to the encoder's request starting
                        (reading, validation, the BLS request crossing to tritonserver)
  into the encoder      the encoder's request queued in Triton
  encoder: hand to lane the encoder's execute(), which only hands the request to a lane
  lane + back to public the lane's encode() and response, the BLS response crossing back, the
                        public stub building its response (one span: the lane answers through its
                        response sender, which Triton does not trace)
  response out          tritonserver sending the response
`lane + back to public` minus the in-process encode() is what the two stubs add around the model;
the last row, each round's client p50 minus its in-process p50 (the median of rounds), is what the
server adds in all. Run nothing else meanwhile: this 2-core machine is noisy.
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

STAGES = {  # name -> (from, to): (trace, timestamp) with trace "public" or "encoder"
    "into the public model": (("public", "GRPC_WAITREAD_END"), ("public", "COMPUTE_START")),
    "public: check, forward": (("public", "COMPUTE_START"), ("encoder", "REQUEST_START")),
    "into the encoder": (("encoder", "REQUEST_START"), ("encoder", "COMPUTE_START")),
    "encoder: hand to lane": (("encoder", "COMPUTE_START"), ("encoder", "COMPUTE_END")),
    "lane + back to public": (("encoder", "COMPUTE_END"), ("public", "COMPUTE_OUTPUT_START")),
    "response out": (("public", "COMPUTE_OUTPUT_START"), ("public", "GRPC_SEND_END")),
}


def read_traces(trace_file: Path) -> list[dict[str, dict[str, int]]]:
    """One {"public": {timestamp: ns}, "encoder": {...}} per public request, in arrival order."""
    models, stamps, parents = {}, collections.defaultdict(dict), {}
    for path in trace_file.parent.glob(trace_file.name + "*"):
        for entry in json.loads(path.read_text() or "[]"):
            if "model_name" in entry:
                models[entry["id"]] = entry["model_name"]
                if "parent_id" in entry:
                    parents[entry["parent_id"]] = entry["id"]
            for stamp in entry.get("timestamps", []):
                stamps[entry["id"]][stamp["name"]] = stamp["ns"]
    requests = [
        {"public": stamps[public], "encoder": stamps[child]}
        for public, child in parents.items()
        if "GRPC_SEND_END" in stamps[public] and "COMPUTE_END" in stamps[child]
    ]
    return sorted(requests, key=lambda r: r["public"]["REQUEST_START"])


def traces_of(trace_file: Path, count: int, timeout_s: float = 10.0) -> list[dict[str, dict[str, int]]]:
    """The first `count` requests' traces, once Triton has written them (it writes each trace as
    the request is released, which can come just after the client has its answer)."""
    deadline = time.monotonic() + timeout_s
    while len(traces := read_traces(trace_file)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(traces) == count, f"{len(traces)} traced requests, expected {count}"
    return traces


def stage_ms(trace: dict[str, dict[str, int]], client_ms: float) -> dict[str, float]:
    stages = {name: (trace[b[0]][b[1]] - trace[a[0]][a[1]]) / 1e6 for name, (a, b) in STAGES.items()}
    server_ms = (trace["public"]["GRPC_SEND_END"] - trace["public"]["GRPC_WAITREAD_END"]) / 1e6
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
        seen = 3 * instances
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
        server.kill()  # measured: no need to wait for Triton to unload 48 instances one by one
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
