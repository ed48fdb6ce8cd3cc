"""What the OpenAI-compatible HTTP layer costs: requests/s and latency through POST /v1/embeddings
against the same requests through gRPC (the contract), at 1 and 16 concurrent clients, side by
side in one run against one server (serve.sh with --openai-port, tiny random NV-Embed-v2 unless
--model-dir). Runs alternate, medians of --repeats. Target: HTTP costs at most 20% at 16 clients.

    .venv/bin/python bench/bench_openai.py [--requests 400] [--repeats 3]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from shared import model_dir_or_tiny

from nvembed_triton.launcher.server import free_port

ROOT = Path(__file__).resolve().parents[1]
MODEL = "nv-embed-v2"
CLIENTS = (1, 16)
TEXT = "How do neural networks learn patterns from examples?"


def start(model_dir: Path, run_dir: Path) -> tuple[subprocess.Popen, int, int]:
    grpc_port, openai_port = free_port(), free_port()
    env = {**os.environ, "TRITON_GRPC_PORT": str(grpc_port), "TRITON_HTTP_PORT": str(free_port()),
           "TRITON_METRICS_PORT": str(free_port()), "NVEMBED_OPENAI_PORT": str(openai_port),
           "NVEMBED_MODEL_DIR": str(model_dir), "PYTHON": sys.executable}  # fmt: skip
    process = subprocess.Popen([str(ROOT / "serve.sh"), "--device", "cpu", "--run-dir", str(run_dir)], env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{openai_port}/health", timeout=2) as response:
                if response.status == 200:
                    return process, grpc_port, openai_port
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("the server did not become ready")


def grpc_worker(port: int, count: int) -> list[float]:
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    tensor = grpcclient.InferInput("documents", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[TEXT.encode()]], dtype=object))
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        client.infer(MODEL, [tensor]).as_numpy("embeddings")
        latencies.append(time.perf_counter() - started)
    client.close()
    return latencies


def http_worker(port: int, count: int) -> list[float]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = json.dumps({"model": MODEL, "input": [TEXT]})
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        connection.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200, response.read()
        json.loads(response.read())
        latencies.append(time.perf_counter() - started)
    connection.close()
    return latencies


def run(worker, port: int, clients: int, requests: int) -> dict:
    per_client = max(1, requests // clients)
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = sorted(x for part in pool.map(lambda _: worker(port, per_client), range(clients)) for x in part)
    elapsed = time.perf_counter() - started
    return {"requests_per_s": len(latencies) / elapsed, "p50_ms": 1e3 * latencies[len(latencies) // 2],
            "p99_ms": 1e3 * latencies[int(len(latencies) * 0.99) - 1]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="default: a generated tiny random checkpoint")
    parser.add_argument("--requests", type=int, default=400, help="per cell")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="bench/results/openai.json")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="nvembed-bench-openai-"))
    model_dir = model_dir_or_tiny(args.model_dir, scratch)
    process, grpc_port, openai_port = start(model_dir, scratch / "run")
    try:
        paths = {"grpc": (grpc_worker, grpc_port), "http": (http_worker, openai_port)}
        for worker, port in paths.values():
            run(worker, port, 4, 40)  # warm up
        cells = {(path, clients): [] for path in paths for clients in CLIENTS}
        for repeat in range(args.repeats):
            for clients in CLIENTS:
                for path, (worker, port) in paths.items():  # alternate, so drifts hit both
                    cell = run(worker, port, clients, args.requests)
                    cells[(path, clients)].append(cell)
                    label = f"run {repeat + 1} {path:4} clients {clients:2}"
                    print(f"{label}: {cell['requests_per_s']:.1f} req/s", file=sys.stderr, flush=True)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    rows = []
    for clients in CLIENTS:
        median = {path: {key: statistics.median(c[key] for c in cells[(path, clients)]) for key in cells[(path, clients)][0]}
                  for path in paths}  # fmt: skip
        ratio = median["http"]["requests_per_s"] / median["grpc"]["requests_per_s"]
        rows.append({"clients": clients, **median, "http_vs_grpc": ratio})
    print("| clients | gRPC req/s | HTTP req/s | HTTP / gRPC | gRPC p50 ms | HTTP p50 ms | gRPC p99 ms | HTTP p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        g, h = r["grpc"], r["http"]
        print(f"| {r['clients']} | {g['requests_per_s']:.1f} | {h['requests_per_s']:.1f} | {r['http_vs_grpc']:.2f} | "
              f"{g['p50_ms']:.1f} | {h['p50_ms']:.1f} | {g['p99_ms']:.1f} | {h['p99_ms']:.1f} |")  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows, "requests": args.requests, "repeats": args.repeats}, indent=2))


if __name__ == "__main__":
    main()
