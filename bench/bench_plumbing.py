"""The serving stack's own ceiling: the shipped model served with the network replaced by the
benchmark-only constant stand-in (setting stand_in = constant; refused under the name nv-embed-v2, so
it is served here as `plumbing`). Single-query requests at 1/16/64 clients over gRPC; for each,
requests/s and the CPU microseconds each process spent per request (tritonserver, the model's stub,
this load generator). On a GPU the forward pass of a batched query takes well under a millisecond,
so this is what keeps a GPU fed, or not.

    .venv/bin/python bench/bench_plumbing.py [--seconds 10] [--repeats 3] [--profile 10] [--model-dir DIR]

The model's stub is one Python process: its CPU time per request bounds a server's requests/s at
1 / (stub CPU s per request) whatever the host. tritonserver spreads over cores. The projection for
a 16-core GPU host is min(1 / stub, 16 / all processes) (bench/RESULTS.md); on a real 16-core GPU
host the measurement came in at half this machine's projection, so measure there.
--profile S samples the stub with py-spy for S seconds at 64 clients and prints where its time
goes. --real-network cuda serves the checkpoint's own network on the GPU instead (the tiny one by
default: the production code path with next to no compute).
Run nothing else meanwhile: this 2-core machine is noisy; the table shows medians.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shared import model_dir_or_tiny, request_inputs, text_of_tokens

from nvembed_triton.launcher.serve import PACKAGED_REPOSITORY, plan, server_settings
from nvembed_triton.launcher.serve import parser as serve_parser
from nvembed_triton.launcher.server import TritonServer, free_port
from nvembed_triton.protocol.contract import PUBLIC_MODEL, QUERY_INPUT
from nvembed_triton.settings import BY_KEY, STAND_IN_CONSTANT, STAND_IN_H200

MODEL = "plumbing"  # never nv-embed-v2: the stand-in is refused under that name
CLIENTS = (1, 16, 64)
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def process_groups(server: TritonServer) -> dict[str, list[int]]:
    stubs = server.stubs()
    return {"tritonserver": [server._process.pid], "model stub": [s.pid for s in stubs], "load generator": [os.getpid()]}


def cpu_by_group(groups: dict[str, list[int]]) -> dict[str, float]:
    return {name: sum(cpu_seconds(pid) for pid in pids) for name, pids in groups.items()}


async def closed_loop(url: str, queries: list[str], clients: int, seconds: float, model: str = MODEL) -> int:
    """`clients` callers, each sending its next query when the last returns, for `seconds`."""
    from tritonclient.grpc import aio

    done = 0
    deadline = time.perf_counter() + seconds

    async def caller(client, offset: int) -> None:
        nonlocal done
        position = offset
        while time.perf_counter() < deadline:
            await client.infer(model, request_inputs(QUERY_INPUT, [queries[position % len(queries)]]))
            done += 1
            position += clients

    async with aio.InferenceServerClient(url) as client:
        await asyncio.gather(*(caller(client, i) for i in range(clients)))
    return done


def measure(server: TritonServer, queries: list[str], clients: int, seconds: float) -> dict:
    groups = process_groups(server)
    before, started, since = cpu_by_group(groups), time.perf_counter(), time.time()
    requests = asyncio.run(closed_loop(server.settings.grpc_url, queries, clients, seconds))
    wall = time.perf_counter() - started
    after = cpu_by_group(groups)
    row = {"clients": clients, "requests_per_s": requests / wall}
    for name in groups:
        row[f"{name} us/request"] = (after[name] - before[name]) / requests * 1e6
    row.update(passes_since(server, since, wall))
    return row


def passes_since(server: TritonServer, since: float, wall: float) -> dict:
    """From the pass log: queries per pass, and the share of the cell's time a pass was running
    (the stand-in's passes wait as a GPU's run: below 1, the stack leaves that GPU idle)."""
    log = Path(server.settings.environment.get(BY_KEY["pass_log"].variable, "/nonexistent"))
    passes = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    passes = [p for p in passes if p["time"] >= since]
    if not passes:
        return {}
    busy_s = sum(p["wall_ms"] for p in passes) / 1e3
    return {"rows per pass": statistics.median(p["rows"] for p in passes), "busy share": busy_s / wall}


def profile(server: TritonServer, group: str, queries: list[str], seconds: float, out: Path) -> list[tuple[str, float]]:
    """py-spy samples of one process of `group` under 64 clients: the share of samples in which
    each function was on the stack (inclusive), our code and the backend's, top first."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    pid = process_groups(server)[group][0]
    command = [py_spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--format", "raw", "--output", str(out),
               "--rate", "200", "--nonblocking"]  # fmt: skip
    recorder = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1)
    asyncio.run(closed_loop(server.settings.grpc_url, queries, 64, seconds + 1))
    recorder.wait(60)
    samples, inclusive = 0, collections.Counter()
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        samples += int(count)
        for label in {frame_label(frame) for frame in stack.split(";")}:
            inclusive[label] += int(count)
    return [(frame, count / samples) for frame, count in inclusive.most_common(25)] if samples else []


def frame_label(frame: str) -> str:
    """py-spy's "function (path/to/file.py:123)" as "function (file.py)"."""
    function, _, where = frame.partition(" (")
    return f"{function} ({where.rsplit('/', 1)[-1].rsplit(':', 1)[0]})" if where else function


def median_rows(rows: list[dict]) -> dict:
    return {key: statistics.median(row[key] for row in rows) for key in rows[0]}


def projection(row: dict, cores: int = 16) -> dict:
    """requests/s a `cores`-core host could sustain: the model's stub is one process (one core at
    most, bounded by its GIL); tritonserver spreads over every core."""
    stub_s = row["model stub us/request"] / 1e6
    if not stub_s:  # every request answered without the model (response-cache hits)
        return {}
    server_s = sum(row[f"{name} us/request"] for name in ("tritonserver", "model stub")) / 1e6
    return {
        "stub_bound_requests_per_s": 1 / stub_s,
        "host_bound_requests_per_s": cores / server_s,
        "projected_requests_per_s": min(1 / stub_s, cores / server_s),
    }


def table(results: dict) -> str:
    names = ("tritonserver", "model stub", "load generator")
    lines = [
        "| clients | requests/s | " + " | ".join(f"{n} µs/req" for n in names) + " | queries per pass | passes running |",
        "|---|---|" + "---|" * len(names) + "---|---|",
    ]
    for row in results["rows"]:
        cells = " | ".join(f"{row[f'{n} us/request']:.0f}" for n in names)
        passes = f" | {row['rows per pass']:.0f} | {row['busy share']:.2f}" if "busy share" in row else " | - | -"
        lines.append(f"| {row['clients']} | {row['requests_per_s']:.0f} | {cells}{passes} |")
    best = results["projection"]
    if best:
        lines.append(
            f"\nAt 64 clients: 1 / stub CPU per request = {best['stub_bound_requests_per_s']:.0f} requests/s per "
            f"stub core; 16 cores / all server CPU per request = {best['host_bound_requests_per_s']:.0f}; "
            f"projected for a 16-core host: {best['projected_requests_per_s']:.0f} requests/s."
        )
    return "\n".join(lines)


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="per cell")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", type=float, default=0.0, help="py-spy the model's stub for this many seconds")
    parser.add_argument("--response-cache", action="store_true",
                        help="also measure Triton's response cache on the model (hits: queries repeat)")
    parser.add_argument("--model-dir", help="NV-Embed-v2 snapshot whose tokenizer is used (default: a generated tiny random one)")
    parser.add_argument("--stand-in", choices=(STAND_IN_CONSTANT, STAND_IN_H200), default=STAND_IN_CONSTANT,
                        help="constant: passes take no time (the stack alone); h200: each pass waits as long as an H200's "
                             "pass of its size took, and the pass log shows how busy the stack keeps such a GPU")
    parser.add_argument("--real-network", metavar="DEVICE",
                        help="serve the checkpoint's real network on DEVICE (cpu, cuda) instead of the stand-in: with the tiny "
                             "checkpoint on a GPU, the whole production path (passes, host-device copies), negligible compute")
    parser.add_argument("--json", default="bench/results/plumbing.json")
    return parser.parse_args()


def start_settings(scratch: Path, model_dir: str | None, response_cache: bool, real_network: str | None = None,
                   stand_in: str = STAND_IN_CONSTANT):
    """The stand-in (or, with real_network, the checkpoint's own network on that device) served as
    MODEL on free ports; with response_cache, the model caches."""
    model_dir = model_dir_or_tiny(model_dir, scratch)  # the stand-in uses only its tokenizer
    pass_log = {BY_KEY["pass_log"].variable: str(scratch / "passes.jsonl")}
    stand_in = pass_log if real_network else {BY_KEY["stand_in"].variable: stand_in, **pass_log}
    environ = {**os.environ, **stand_in, "TRITON_GRPC_PORT": str(free_port()),
               "TRITON_HTTP_PORT": str(free_port()), "TRITON_METRICS_PORT": str(free_port())}  # fmt: skip
    if response_cache:
        repository = Path(shutil.copytree(PACKAGED_REPOSITORY, scratch / "cached", ignore=shutil.ignore_patterns("__pycache__")))
        with open(repository / PUBLIC_MODEL / "config.pbtxt", "a") as config:
            config.write("response_cache { enable: true }\n")
        environ[BY_KEY["model_repository"].variable] = str(repository)
    device = real_network or "cpu"
    plan_ = plan(serve_parser().parse_args(["--model-dir", str(model_dir), "--device", device, "--name", MODEL]), environ)
    settings = server_settings(plan_, scratch / ("run-cached" if response_cache else "run"), environ)
    return dataclasses.replace(
        settings,
        environment={**settings.environment, **stand_in},
        response_cache_bytes=2**28 if response_cache else 0,
    )


def sweep(settings, queries: list[str], args: argparse.Namespace, profile_into: Path | None) -> dict:
    results: dict = {}
    with TritonServer(settings) as server:
        asyncio.run(closed_loop(settings.grpc_url, queries, 16, 2.0))  # warm up (and, cached, fill the cache)
        runs: dict[int, list[dict]] = {clients: [] for clients in CLIENTS}
        for repeat in range(args.repeats):
            for clients in CLIENTS:
                row = measure(server, queries, clients, args.seconds)
                runs[clients].append(row)
                print(f"run {repeat + 1} clients {clients:2}: {row['requests_per_s']:.0f} req/s, stub "
                      f"{row['model stub us/request']:.0f} µs/req", flush=True)  # fmt: skip
        results["rows"] = [median_rows(runs[clients]) for clients in CLIENTS]
        results["projection"] = projection(results["rows"][-1])
        if profile_into:
            results["model stub profile"] = profile(server, "model stub", queries, args.profile, profile_into)
    return results


def main() -> int:
    args = arguments()
    scratch = Path(tempfile.mkdtemp(prefix="nvembed-plumbing-"))
    rng = random.Random(0)
    queries = [text_of_tokens(rng, rng.randint(6, 24)) for _ in range(512)]
    profile_into = scratch / "profile.pyspy" if args.profile else None
    results = sweep(start_settings(scratch, args.model_dir, False, args.real_network, args.stand_in), queries, args, profile_into)
    network = f"real network on {args.real_network}" if args.real_network else f"{args.stand_in} stand-in"
    results["setup"] = {"seconds": args.seconds, "repeats": args.repeats, "cpus": os.cpu_count(), "network": network,
                        "load": os.getloadavg()}  # fmt: skip
    print(f"network: {network}")
    print(table(results))
    for frame, share in results.get("model stub profile", [])[:15]:
        print(f"model stub: {share:6.1%}  {frame}")
    if args.response_cache:
        results["response_cache"] = sweep(start_settings(scratch, args.model_dir, True, args.real_network), queries, args, None)
        print("\nwith Triton's response cache on the model (every query repeats, so all hits):")
        print(table(results["response_cache"]))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\nJSON: {args.json}")
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
