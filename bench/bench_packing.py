"""Packed passes vs padded ones, in one process on the same encoder: documents of mixed length
(16..2048 tokens, log-uniform, fixed seed) sent as one request.

    .venv/bin/python bench/bench_packing.py [--model-dir DIR] [--device cpu] [--documents 32]

Rows: packed (texts end to end, no padding, token-budget passes: the GPU's path); padded (sorted,
token-budget passes with bounded padding: the CPU's); one pass padded to the longest;
reference-style (fixed batches of 8 in input order, each padded to its longest). Tokens computed
count padding; tokens/s counts real tokens only; medians over alternating repeats. On a CPU packed
passes run attention one text at a time (no varlen kernel): read their speed on a GPU.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from shared import log_uniform_lengths

from nvembed_triton.engine.batching import padded_tokens, plan_batches
from nvembed_triton.engine.encoders import load_encoder
from nvembed_triton.engine.packing import plan_packed
from nvembed_triton.settings import EncoderSettings

WORDS = "the model learns patterns from examples while markets set prices by supply and demand".split()


def mixed_documents(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lengths = log_uniform_lengths(rng, count)
    return [" ".join(rng.choice(WORDS) for _ in range(n)) for n in lengths]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="NV-Embed-v2 snapshot (default: a generated tiny random one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--documents", type=int, default=32)
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default="bench/results/packing.json")
    args = parser.parse_args()

    if args.model_dir:
        model_dir = args.model_dir
    else:
        from nvembed_triton.testing.tiny_checkpoint import write_tiny_checkpoint

        model_dir = str(write_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny"))
    parameters = {"model_dir": model_dir, "device": args.device, "max_batch_tokens": str(args.max_batch_tokens)}
    encoder = load_encoder(EncoderSettings.from_parameters(parameters))
    texts = mixed_documents(args.documents)
    tokenized = encoder.tokenizer.encode(texts, [""] * len(texts))
    lengths = [len(t.ids) for t in tokenized]
    plans = {
        "packed (token budget)": plan_packed(lengths, args.max_batch_tokens),
        "padded (token budget)": plan_batches(lengths, args.max_batch_tokens),
        "pad to longest": [list(range(len(texts)))],
        "reference-style (batches of 8)": [list(range(i, min(i + 8, len(texts)))) for i in range(0, len(texts), 8)],
    }
    computed = {name: sum(lengths) if name.startswith("packed") else padded_tokens(lengths, plan) for name, plan in plans.items()}

    def run(plan, packed: bool) -> float:
        encoder.packed = packed
        started = time.perf_counter()
        for batch in plan:
            encoder.embed_tokenized([tokenized[i] for i in batch])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - started

    for name, plan in plans.items():
        run(plan, name.startswith("packed"))  # warm up
    times = {name: [] for name in plans}
    for _ in range(args.repeats):  # alternate, so drifts in machine load hit every row
        for name, plan in plans.items():
            times[name].append(run(plan, name.startswith("packed")))
    real = sum(lengths)
    rows = []
    print(f"{len(texts)} documents, {real} real tokens, lengths {min(lengths)}..{max(lengths)}, device {args.device}")
    print("| plan | passes | tokens computed | per real token | real tokens/s |\n|---|---|---|---|---|")
    for name, plan in plans.items():
        rate = real / statistics.median(times[name])
        rows.append({"plan": name, "passes": len(plan), "computed_tokens": computed[name], "tokens_per_s": rate})
        print(f"| {name} | {len(plan)} | {computed[name]} | {computed[name] / real:.3f} | {rate:.0f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"documents": len(texts), "real_tokens": real, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
