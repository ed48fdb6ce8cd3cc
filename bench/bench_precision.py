"""How far bf16 (the GPU default) and fp16 serving land from fp32 at full size, and which part of the
model loses the difference. Random weights built on the GPU (no download), rounded to fp16 because
the published checkpoint stores fp16 tensors: the fp32 run is then an exact upcast of "the checkpoint".
From the repository root:

    PYTHONPATH=src python bench/bench_precision.py          # H100/H200: ~70 GB of GPU memory, 1-2 minutes
    PYTHONPATH=src python bench/bench_precision.py --tiny   # the tiny test config on the CPU: checks the logic only

Random token ids; each document alone (no padding), as the planner sends most passes, plus one row
through the planner's padded batches. Every row is the cosine of its embeddings with the fp32
production path's (TF32 off), over the documents: min / median / mean.
- fp32, math SDPA: the fp32 reference's own noise floor (another attention kernel).
- bf16, fp16: the production path (NVEmbedModel.embed) in that dtype; bf16 padded batches too.
- bf16 backbone -> fp32 head, fp32 backbone -> bf16 head: which half loses it.
- fp32 with weights rounded to bf16: the weights' rounding alone, no low-precision arithmetic.
- fp32, residual rounded to bf16 once after layer k: one bf16-sized perturbation and how much the
  layers after it amplify it. A random network can amplify far more than a trained one, so a row
  here near the bf16 row means random weights, not bf16 arithmetic, set the limit.
Then the backbone's hidden states, bf16 vs fp32, after each layer (mean token cosine and relative
error) on a few documents: where along the depth the difference grows.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from bench_gpu import FIRST_ORDINARY_ID, GIB, build_model, model_setup, pad
from shared import log_uniform_lengths, write_json
from torch.nn.attention import SDPBackend, sdpa_kernel

from nvembed_triton.engine.batching import plan_batches
from nvembed_triton.engine.nvembed_model import NVEmbedModel

TARGET = 0.999
STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:5.0f} s] {message}", file=sys.stderr, flush=True)


@torch.no_grad()
def copy_weights(source: NVEmbedModel, target: NVEmbedModel) -> None:
    """target gets source's weights, rounded to its own dtype."""
    for mine, theirs in zip(target.parameters(), source.parameters(), strict=True):
        mine.copy_(theirs)
    target.head.precompute_latent_keys_values()


@torch.no_grad()
def round_weights(model: NVEmbedModel, dtype: torch.dtype) -> None:
    """In place: every weight rounded to `dtype` and kept in the model's own dtype."""
    for weight in model.parameters():
        weight.copy_(weight.to(dtype))
    model.head.precompute_latent_keys_values()


def single(doc: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    input_ids = doc[None].to(device)
    valid = torch.ones_like(input_ids, dtype=torch.bool)
    return input_ids, valid, torch.zeros(1, dtype=torch.long, device=device)


def embed_each(model: NVEmbedModel, docs: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.cat([model.embed(*single(doc, device)).double().cpu() for doc in docs])


def embed_planned(model: NVEmbedModel, docs: list[torch.Tensor], max_batch_tokens: int, device: torch.device) -> torch.Tensor:
    """Through the planner's padded passes, as the server runs them; rows back in input order."""
    out = torch.empty(len(docs), model.dimension, dtype=torch.float64)
    for batch in plan_batches([len(d) for d in docs], max_batch_tokens):
        input_ids, valid = pad(docs, batch)
        pool_from = torch.zeros(len(batch), dtype=torch.long)
        out[batch] = model.embed(input_ids.to(device), valid.to(device), pool_from.to(device)).double().cpu()
    return out


def embed_hybrid(backbone: NVEmbedModel, head: NVEmbedModel, docs: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """One model's backbone, the other's pooling head (the hidden states cast to the head's dtype)."""
    rows = []
    for doc in docs:
        input_ids, valid, pool_from = single(doc, device)
        hidden = backbone.token_states(input_ids, valid).to(head.head.latents.dtype)
        rows.append(head.pool(hidden, valid, pool_from).double().cpu())
    return torch.cat(rows)


def round_residual_after(model: NVEmbedModel, layer: int):
    """A forward hook that rounds layer `layer`'s output (the residual stream) to bf16 once."""

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0].to(torch.bfloat16).to(output[0].dtype), *output[1:])
        return output.to(torch.bfloat16).to(output.dtype)

    return model.backbone.layers[layer - 1].register_forward_hook(hook)


def cosines(ours: torch.Tensor, reference: torch.Tensor) -> list[float]:
    return F.cosine_similarity(ours, reference, dim=-1).tolist()


@torch.inference_mode()
def layer_drift(low: NVEmbedModel, high: NVEmbedModel, docs: list[torch.Tensor], device: torch.device) -> list[dict]:
    """Per hidden_states index (0: embeddings, i: after layer i, last: after the final norm): mean
    over documents of the mean token cosine and of the relative Frobenius error, low vs high."""
    per_layer: dict[int, list[tuple[float, float]]] = {}
    for doc in docs:
        input_ids, _, _ = single(doc, device)
        states = [m.backbone(input_ids=input_ids, use_cache=False, output_hidden_states=True).hidden_states for m in (low, high)]
        for index, (a, b) in enumerate(zip(*states, strict=True)):
            a, b = a[0].double(), b[0].double()
            cosine = F.cosine_similarity(a, b, dim=-1).mean().item()
            relative = ((a - b).norm() / b.norm()).item()
            per_layer.setdefault(index, []).append((cosine, relative))
    return [
        {"index": i, "token_cosine": statistics.mean(c for c, _ in v), "relative_error": statistics.mean(r for _, r in v)}
        for i, v in sorted(per_layer.items())
    ]


def summary(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "mean": statistics.mean(values), "all": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny test config instead (runs on CPU without a GPU)")
    parser.add_argument("--docs", type=int, default=14, help="documents of log-uniform length 16..2048")
    parser.add_argument("--long", type=int, nargs="*", default=[4096, 8192], help="extra documents of these lengths")
    parser.add_argument("--drift-docs", type=int, default=3, help="documents for the per-layer table")
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="default: bench/results/precision.json (precision-tiny.json with --tiny)")
    args = parser.parse_args()
    device, text_config, latent = model_setup(parser, args.tiny)
    # A true fp32 reference: no TF32 in matmuls.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    lengths = log_uniform_lengths(rng, args.docs) + args.long
    docs = [torch.randint(FIRST_ORDINARY_ID, text_config["vocab_size"], (n,)) for n in lengths]

    fp32 = build_model(text_config, latent, device, torch.float32)
    round_weights(fp32, torch.float16)  # the checkpoint's grid
    bf16 = build_model(text_config, latent, device, torch.bfloat16)
    copy_weights(fp32, bf16)
    log(f"built fp32 and bf16 models; {len(docs)} documents, {sum(lengths)} tokens")

    reference = embed_each(fp32, docs, device)
    rows: dict[str, list[float]] = {}

    def row(name: str, embeddings: torch.Tensor) -> None:
        rows[name] = cosines(embeddings, reference)
        log(f"{name}: min {min(rows[name]):.6f}")

    with sdpa_kernel(SDPBackend.MATH):
        row("fp32, math SDPA (reference noise floor)", embed_each(fp32, docs, device))
    row("bf16 (production)", embed_each(bf16, docs, device))
    row("bf16, planner's padded batches", embed_planned(bf16, docs, args.max_batch_tokens, device))
    row("bf16 backbone -> fp32 head", embed_hybrid(bf16, fp32, docs, device))
    row("fp32 backbone -> bf16 head", embed_hybrid(fp32, bf16, docs, device))
    layers = text_config["num_hidden_layers"]
    for layer in sorted({1, layers // 2, layers - 1}):
        handle = round_residual_after(fp32, layer)
        try:
            row(f"fp32, residual rounded to bf16 once after layer {layer}", embed_each(fp32, docs, device))
        finally:
            handle.remove()
    drift = layer_drift(bf16, fp32, docs[: args.drift_docs], device)
    log("per-layer drift done")
    del bf16
    fp16 = build_model(text_config, latent, device, torch.float16)
    copy_weights(fp32, fp16)
    row("fp16", embed_each(fp16, docs, device))
    del fp16
    round_weights(fp32, torch.bfloat16)  # last: the pristine fp32 weights are gone after this
    row("fp32 with weights rounded to bf16", embed_each(fp32, docs, device))

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (tiny smoke test: numbers meaningless)"
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    result = {
        "gpu": gpu, "torch": torch.__version__, "tiny": args.tiny, "lengths": lengths, "target": TARGET,
        "rows": {name: summary(values) for name, values in rows.items()}, "layer_drift": drift, "peak_gib": peak,
    }  # fmt: skip
    print_markdown(result)
    write_json(result, args.json or f"bench/results/precision{'-tiny' if args.tiny else ''}.json")


def print_markdown(r: dict) -> None:
    print(f"Cosine with the fp32 production path, {len(r['lengths'])} documents of {min(r['lengths'])}..{max(r['lengths'])} "
          f"tokens, random fp16-grid weights, on {r['gpu']} (torch {r['torch']}); target >= {r['target']}.\n")  # fmt: skip
    print("| variant | min | median | mean | longest doc |")
    print("|---|---|---|---|---|")
    for name, s in r["rows"].items():
        print(f"| {name} | {s['min']:.6f} | {s['median']:.6f} | {s['mean']:.6f} | {s['all'][-1]:.6f} |")
    print("\nBackbone hidden states, bf16 vs fp32 (0: embeddings; last: after the final norm):\n")
    print("| index | mean token cosine | relative error |")
    print("|---|---|---|")
    for d in r["layer_drift"]:
        print(f"| {d['index']} | {d['token_cosine']:.6f} | {d['relative_error']:.4f} |")


if __name__ == "__main__":
    main()
