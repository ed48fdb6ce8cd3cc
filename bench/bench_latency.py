"""A lone query's latency through the server against the same encoder without it, two ways, and
where the server's share goes, stage by stage: serve.sh --demo (all-MiniLM-L6-v2 on the CPU, or
--model-dir) with Triton's own tracing on (every request, level TIMESTAMPS), single queries sent one
after another over gRPC as the seed's client sends them (asking for `embeddings` alone).

    .venv/bin/python bench/bench_latency.py [--queries 300] [--rounds 3] [--model-dir DIR] [--json PATH]

The two comparisons:
  paired        each query is paired with the same text through the same encoder in this process
                (encode() of one text), just before or after it: the two never run at once, and each
                pair meets the same moment of this shared machine. Each round's client p50 minus its
                in-process p50 (the median of rounds) is what the server adds.
  fresh process as a user measures it: after the rounds, the server is stopped and a fresh Python
                process loads the same encoder (load_encoder), warms up with 30 texts and embeds the
                same texts one by one; the server's p50 over all rounds minus that p50.
The stages, from Triton's timestamps (ms, medians over the steady queries, each round; then the
median round):
  client + gRPC   the client's own time minus what the server saw from reading the request to
                  sending the response (tritonclient, the loopback, gRPC framing)
  into the model  reading the request to the model's execute() (Triton's queue)
  the model       from execute() to its response reaching tritonserver: reading and checking, the
                  hand-off to a lane, encode(), the response
  response out    tritonserver sending the response
`the model` minus the in-process encode() is what the stub adds around the encoder. Run nothing else
meanwhile: this 2-core machine is noisy.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from shared import request_inputs, text_of_tokens, write_json

from nvembed_triton.engine.encoders import load_encoder
from nvembed_triton.launcher.serve import parser as serve_parser
from nvembed_triton.launcher.serve import plan, server_settings
from nvembed_triton.launcher.server import TritonServer, free_port
from nvembed_triton.protocol.contract import EMBEDDINGS_OUTPUT, QUERY_INPUT
from nvembed_triton.protocol.options import TextOptions
from nvembed_triton.settings import EncoderSettings

STAGES = {  # name -> (from, to): timestamps of the request's trace
    "into the model": ("GRPC_WAITREAD_END", "COMPUTE_START"),
    "the model": ("COMPUTE_START", "INFER_RESPONSE_COMPLETE"),
    "response out": ("INFER_RESPONSE_COMPLETE", "GRPC_SEND_END"),
}
FRESH_WARM_UP = 30  # texts the fresh process embeds before it measures, as the server's warm-up


def read_traces(trace_file: Path) -> list[dict[str, int]]:
    """The requests' traces ({timestamp: ns}), in arrival order."""
    stamps = collections.defaultdict(dict)
    for path in trace_file.parent.glob(trace_file.name + "*"):
        for entry in json.loads(path.read_text() or "[]"):
            for stamp in entry.get("timestamps", []):
                stamps[entry["id"]][stamp["name"]] = stamp["ns"]
    requests = [trace for trace in stamps.values() if "GRPC_SEND_END" in trace and "REQUEST_START" in trace]
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


def through_server(args, scratch: Path, texts: list[list[str]]) -> tuple[dict, str]:
    """The first request, a warm-up, then the rounds: each text through the server and through the
    same encoder in this process (loaded once the server is up), pair by pair."""
    plan_ = plan(
        serve_parser().parse_args(["--demo"] if args.model_dir is None else ["--model-dir", args.model_dir, "--device", "cpu"])
    )
    environ = {**os.environ, "TRITON_HOST": "127.0.0.1"}
    environ.update({name: str(free_port()) for name in ("TRITON_GRPC_PORT", "TRITON_HTTP_PORT", "TRITON_METRICS_PORT")})
    trace_file = scratch / "trace" / "trace.json"
    trace_file.parent.mkdir(parents=True)
    settings = dataclasses.replace(server_settings(plan_, scratch / "run", environ), trace_file=trace_file)
    results = {"rounds": [], "in-process encode p50 ms": [], "client ms": []}
    with TritonServer(settings) as server:
        encoder = in_process_encoder(str(plan_.model_dir), texts[0][:50])
        url = settings.grpc_url
        first, _ = lone_queries(url, plan_.name, texts[0][:1])
        results["first request"] = summary([stage_ms(t, c) for t, c in zip(traces_of(trace_file, 1), first, strict=True)])
        seen = 100  # past the first requests
        lone_queries(url, plan_.name, texts[0][1:seen], encoder)  # warm-up
        for round_texts in texts[1:]:
            client, local = lone_queries(url, plan_.name, round_texts, encoder)
            traces = traces_of(trace_file, seen + len(round_texts))[seen:]
            seen += len(round_texts)
            results["rounds"].append(summary([stage_ms(t, c) for t, c in zip(traces, client, strict=True)]))
            results["in-process encode p50 ms"].append(statistics.median(local))
            results["client ms"].extend(client)
            print(
                f"round {len(results['rounds'])}: p50 {results['rounds'][-1]['total (client)']['p50']:.2f} ms, "
                f"in-process {results['in-process encode p50 ms'][-1]:.2f} ms",
                file=sys.stderr,
            )
        server.kill()  # measured: no need to wait for Triton to unload its instances
    return results, str(plan_.model_dir)


def fresh_process_ms(model_dir: str, warm_up: list[str], texts: list[str]) -> list[float]:
    """ms of each text through the encoder in a fresh Python process, after a warm-up, as a user
    would time the model without a server."""
    code = (
        "import json, sys, time\n"
        "from nvembed_triton.engine.encoders import load_encoder\n"
        "from nvembed_triton.protocol.options import TextOptions\n"
        "from nvembed_triton.settings import EncoderSettings\n"
        "model_dir, warm_up, texts = json.load(sys.stdin)\n"
        "encoder = load_encoder(EncoderSettings.from_parameters({'model_dir': model_dir, 'device': 'cpu'}))\n"
        "for text in warm_up: encoder.encode([text], [TextOptions()])\n"
        "ms = []\n"
        "for text in texts:\n"
        "    started = time.perf_counter(); encoder.encode([text], [TextOptions()])\n"
        "    ms.append((time.perf_counter() - started) * 1e3)\n"
        "print(json.dumps(ms))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], input=json.dumps([model_dir, warm_up, texts]), capture_output=True,
                            text=True, check=True)  # fmt: skip
    return json.loads(result.stdout.splitlines()[-1])


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
        "| stage | first request, p50 | steady p50 (median of rounds) | rounds' p50 | steady p90 |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        p50s = [r[name]["p50"] for r in rounds]
        lines.append(
            f"| {name} | {results['first request'][name]['p50']:.2f} | **{statistics.median(p50s):.2f}** "
            f"| {' / '.join(f'{v:.2f}' for v in p50s)} | {statistics.median(r[name]['p90'] for r in rounds):.2f} |"
        )
    encode = results["in-process encode p50 ms"]
    gaps = [r["total (client)"]["p50"] - e for r, e in zip(rounds, encode, strict=True)]
    rows = (("in-process encode() of the same texts", encode), ("**paired: through the server minus in-process**", gaps))
    for name, values in rows:
        lines.append(f"| {name} | | **{statistics.median(values):.2f}** | {' / '.join(f'{v:.2f}' for v in values)} | |")
    fresh = results["fresh process"]
    lines.append(f"| fresh process: encode() p50 | | {fresh['p50 ms']:.2f} | | |")
    lines.append(f"| **fresh process: through the server p50 minus it** | | **{fresh['server minus fresh ms']:.2f}** | | |")
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
        results, model_dir = through_server(args, Path(scratch), texts)
    fresh = fresh_process_ms(model_dir, texts[0][:FRESH_WARM_UP], [t for round_ in texts[1:] for t in round_])
    server_p50 = statistics.median(results.pop("client ms"))
    results["fresh process"] = {"p50 ms": statistics.median(fresh), "server p50 ms": server_p50,
                                "server minus fresh ms": server_p50 - statistics.median(fresh)}  # fmt: skip
    results["setup"] = {"model_dir": model_dir, "queries": args.queries, "cpus": os.cpu_count(), "load": os.getloadavg()}
    write_json(results, args.json)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
