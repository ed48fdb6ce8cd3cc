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


async def sweep(urls: dict[str, str], model: str, requests: dict, args: argparse.Namespace, workloads: dict = WORKLOADS) -> dict:
    """Every `workloads` cell on each server (`urls`: name -> gRPC URL), rounds alternating which goes first."""
    from tritonclient.grpc import aio

    sides = list(urls)
    runs: dict = {name: {side: [] for side in sides} for name in workloads}
    async with AsyncExitStack() as stack:
        clients = {side: await stack.enter_async_context(aio.InferenceServerClient(urls[side])) for side in sides}
        for side in sides:  # every connection and code path once
            for workload in workloads.values():
                send = project_sender(clients[side], model, workload.passages)
                await closed_loop(send, pool_of(requests, workload), workload.clients, None, workload.clients)
        for repeat in range(args.repeats):
            for name, workload in workloads.items():
                for side in sides if repeat % 2 == 0 else sides[::-1]:
                    send = project_sender(clients[side], model, workload.passages)
                    cell = await closed_loop(send, pool_of(requests, workload), workload.clients, args.seconds, None)
                    runs[name][side].append(cell)
                    print(f"run {repeat + 1} {name:22} {side:8}: {cell['requests_per_s']:7.1f} req/s", file=sys.stderr)
    return runs


def table(runs: dict) -> str:
    """Medians (min-max) per cell and the ratio of the first side to the second."""
    first, second = next(iter(runs.values()))
    lines = [f"| workload | {first} req/s | {second} req/s | {first} / {second} | p50 ms {first} / {second} |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name, by_side in runs.items():
        rates = {side: [cell["requests_per_s"] for cell in cells] for side, cells in by_side.items()}
        p50 = {side: statistics.median(cell["p50_ms"] for cell in cells) for side, cells in by_side.items()}
        median = {side: statistics.median(values) for side, values in rates.items()}
        shown = [f"{median[side]:.1f} ({min(rates[side]):.1f}-{max(rates[side]):.1f})" for side in (first, second)]
        lines.append(f"| {name} | {shown[0]} | {shown[1]} | {median[first] / median[second]:.2f} "
                     f"| {p50[first]:.1f} / {p50[second]:.1f} |")  # fmt: skip
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
