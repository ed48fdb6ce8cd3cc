"""The production path's settings on a GPU: bf16 against fp16 (the checkpoint's own dtype) and the
planner's token budget (max_batch_tokens), side by side in one process. Full-size random weights
built on the GPU, as in bench_gpu.py. From the repository root:

    PYTHONPATH=src python bench/bench_gpu_sweep.py          # H100/H200, ~35 GB of GPU memory, ~2 minutes
    PYTHONPATH=src python bench/bench_gpu_sweep.py --tiny   # the tiny test config on the CPU: checks the logic only

Workloads: 256 documents of 128 tokens, and the mixed set (16..2048 tokens, log-uniform). Each
(budget, dtype) cell runs once to warm up and then --repeats times, cells alternating; medians. Then
one 32k-token document in each dtype: time, peak memory above the weights, and whether it is finite.
"""

from __future__ import annotations

import argparse
import random
import statistics

import torch
from bench_gpu import (
    FIRST_ORDINARY_ID,
    build_model,
    log,
    measure_matmul_tflops,
    model_setup,
    ours_forward,
    run,
    run_with_peak,
    write_json,
)
from shared import log_uniform_lengths

from nvembed_triton.engine.batching import padded_tokens, plan_batches

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--budgets", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--docs-128", type=int, default=256)
    parser.add_argument("--docs-mixed", type=int, default=192)
    parser.add_argument("--long-tokens", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="default: bench/results/gpu-sweep.json")
    args = parser.parse_args()
    device, text_config, latent = model_setup(parser, args.tiny)
    torch.manual_seed(args.seed)
    matmul_tflops = measure_matmul_tflops(device) if device.type == "cuda" else None
    models = {name: build_model(text_config, latent, device, dtype) for name, dtype in DTYPES.items()}
    parameters = sum(p.numel() for p in models["bf16"].parameters())
    log(f"built bf16 and fp16 models; matmul {matmul_tflops} TFLOP/s")

    rng = random.Random(args.seed)
    workloads = {
        "128 tokens": [128] * args.docs_128,
        "mixed 16..2048": log_uniform_lengths(rng, args.docs_mixed),
    }
    cells = []
    for workload, lengths in workloads.items():
        docs = [torch.randint(FIRST_ORDINARY_ID, text_config["vocab_size"], (n,)) for n in lengths]
        plans = {budget: plan_batches(lengths, budget) for budget in args.budgets}
        keys = [(budget, name) for budget in args.budgets for name in DTYPES]
        peaks = {k: run_with_peak(ours_forward, models[k[1]], docs, plans[k[0]], device)[1] for k in keys}
        times = {k: [] for k in keys}
        for _ in range(args.repeats):
            for k in keys:
                times[k].append(run(ours_forward, models[k[1]], docs, plans[k[0]], device))
        for (budget, name), runs in times.items():
            seconds = statistics.median(runs)
            cells.append({
                "workload": workload, "budget": budget, "dtype": name, "passes": len(plans[budget]),
                "padded_tokens": padded_tokens(lengths, plans[budget]), "real_tokens": sum(lengths), "runs_s": runs,
                "tokens_per_s": sum(lengths) / seconds, "peak_extra_gib": peaks[(budget, name)],
                "mfu_measured": matmul_tflops and 2 * parameters * sum(lengths) / seconds / (matmul_tflops * 1e12),
            })  # fmt: skip
        log(f"{workload} done")

    long = {}
    for name, model in models.items():
        doc = [torch.randint(FIRST_ORDINARY_ID, text_config["vocab_size"], (args.long_tokens,))]
        run(ours_forward, model, doc, [[0]], device)
        seconds, extra = run_with_peak(ours_forward, model, doc, [[0]], device)
        finite = bool(
            torch.isfinite(
                ours_forward(model, doc[0][None].to(device), torch.ones(1, len(doc[0]), dtype=torch.bool, device=device))
            ).all()
        )
        long[name] = {"seconds": seconds, "peak_extra_gib": extra, "finite": finite}
    result = {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU", "matmul_tflops": matmul_tflops,
              "cells": cells, "long_document": {"tokens": args.long_tokens, **long}}  # fmt: skip
    print_markdown(result)
    write_json(result, args.json or "bench/results/gpu-sweep.json")


def print_markdown(r: dict) -> None:
    print(f"Production path on {r['gpu']}; matmul {r['matmul_tflops']} TFLOP/s. Medians; tokens/s counts real tokens.\n")
    print("| workload | max_batch_tokens | dtype | passes | padded tokens | tokens/s | MFU (measured matmul) | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for c in r["cells"]:
        mfu = "n/a" if c["mfu_measured"] is None else f"{c['mfu_measured']:.1%}"
        peak = "n/a" if c["peak_extra_gib"] is None else f"{c['peak_extra_gib']:.1f}"
        cells = [c["workload"], c["budget"], c["dtype"], c["passes"], c["padded_tokens"], f"{c['tokens_per_s']:.0f}", mfu, peak]
        print("| " + " | ".join(str(cell) for cell in cells) + " |")
    long = r["long_document"]
    for name in DTYPES:
        d = long[name]
        peak = "n/a" if d["peak_extra_gib"] is None else f"{d['peak_extra_gib']:.1f}"
        print(f"\n{long['tokens']}-token document, {name}: {d['seconds']:.2f} s, peak {peak} GiB, finite: {d['finite']}")


if __name__ == "__main__":
    main()
