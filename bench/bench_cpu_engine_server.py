"""This project's server with each CPU engine side by side: cpu_engine openvino (the default) and
onednn (torch with packed linear layers, the engine before it), both serve.sh --demo servers up
throughout, the same closed-loop cells and texts as bench_peers.py, rounds alternating which goes
first. The question it answers: does the engine that makes a lone query faster lose throughput
under concurrency?

    .venv/bin/python bench/bench_cpu_engine_server.py [--seconds 10] [--repeats 3] [--json PATH]

Prints medians (min-max) and the ratio openvino / onednn per cell; writes every cell to the JSON.
Run nothing else meanwhile (2 cores: the client shares them with the server it measures).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from contextlib import AsyncExitStack, ExitStack
from pathlib import Path

from bench_peers import WORKLOADS, closed_loop, make_requests, pool_of, project_sender, project_server
from shared import write_json

ENGINES = ("openvino", "onednn")


async def sweep(urls: dict[str, str], model: str, requests: dict, args: argparse.Namespace) -> dict:
    from tritonclient.grpc import aio

    runs: dict = {name: {engine: [] for engine in ENGINES} for name in WORKLOADS}
    async with AsyncExitStack() as stack:
        clients = {engine: await stack.enter_async_context(aio.InferenceServerClient(urls[engine])) for engine in ENGINES}
        for engine in ENGINES:  # every connection and code path once
            for workload in WORKLOADS.values():
                send = project_sender(clients[engine], model, workload.passages)
                await closed_loop(send, pool_of(requests, workload), workload.clients, None, workload.clients)
        for repeat in range(args.repeats):
            for name, workload in WORKLOADS.items():
                for engine in ENGINES if repeat % 2 == 0 else ENGINES[::-1]:
                    send = project_sender(clients[engine], model, workload.passages)
                    cell = await closed_loop(send, pool_of(requests, workload), workload.clients, args.seconds, None)
                    runs[name][engine].append(cell)
                    print(f"run {repeat + 1} {name:22} {engine:8}: {cell['requests_per_s']:7.1f} req/s", file=sys.stderr)
    return runs


def table(runs: dict) -> str:
    lines = ["| workload | openvino req/s | onednn req/s | openvino / onednn | p50 ms openvino / onednn |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name, by_engine in runs.items():
        rates = {engine: [cell["requests_per_s"] for cell in cells] for engine, cells in by_engine.items()}
        p50 = {engine: statistics.median(cell["p50_ms"] for cell in cells) for engine, cells in by_engine.items()}
        median = {engine: statistics.median(values) for engine, values in rates.items()}
        shown = [f"{median[e]:.1f} ({min(rates[e]):.1f}-{max(rates[e]):.1f})" for e in ENGINES]
        lines.append(f"| {name} | {shown[0]} | {shown[1]} | {median['openvino'] / median['onednn']:.2f} "
                     f"| {p50['openvino']:.1f} / {p50['onednn']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="bench/results/cpu-engine-server.json")
    args = p.parse_args()
    requests = make_requests(args.seed)
    with tempfile.TemporaryDirectory(prefix="nvembed-cpu-engine-server-") as scratch, ExitStack() as servers:
        urls = {}
        for engine in ENGINES:
            urls[engine], model, _ = servers.enter_context(project_server(Path(scratch) / engine, cpu_engine=engine))
        runs = asyncio.run(sweep(urls, model, requests, args))
    print(table(runs))
    write_json({"setup": vars(args), "runs": runs}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
