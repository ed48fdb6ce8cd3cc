"""Full-size NV-Embed-v2 (7.85B parameters, random weights built on the GPU: no download) on the
production path next to a reference-style baseline, in one run. From the repository root:

    PYTHONPATH=src python bench/bench_gpu.py            # H100/H200, ~35 GB of GPU memory, a few minutes
    PYTHONPATH=src python bench/bench_gpu.py --tiny --docs-128 16 --docs-512 8 --docs-4096 2 --docs-mixed 16
                                                        # the tiny test config on the CPU: checks the logic only

First one --long-tokens (32768) document through the production path, while only its model is
loaded: time and peak memory, or a FAIL line on out-of-memory. Then four workloads, each run by
both paths: documents of exactly 128, 512 and 4096 tokens, and a mixed set (16..2048 tokens,
log-uniform, fixed seed, in that random order) where padding matters. Token ids are random.
- ours: the production path. Passes planned by token budget (plan_batches, --max-batch-tokens),
  each through NVEmbedModel.embed in bf16: bidirectional SDPA (no mask when a pass has no padding,
  else a (B,1,1,L) key mask), no KV cache, the
  latents' keys/values computed once at load, the pooling head on pooled tokens only.
- reference: what the published modeling code does. A second model (fp16, its own random weights;
  two 15.7 GB copies fit) run under fp16 autocast; fixed batches of --reference-batch-size in input
  order, each padded to its longest; a materialised additive (B,1,L,L) attention mask
  (_prepare_4d_attention_mask; its layers run SDPA); the pooling head over every position, padding
  included, recomputing the latents' keys/values per call; then a masked mean.
Tokenisation and the reference's DataLoader are not counted. Both paths pad batches on the host and
copy the embeddings back per pass, as the server does. tokens/s counts real tokens;
MFU = 2 x parameters x real tokens / time / peak, against the nominal bf16 dense peak
(--peak-tflops) and against this GPU's bf16 matmul rate, measured at start (--measured-tflops).
Medians over alternating repeats, after a warm-up run that also gives each path's peak memory.
Prints a markdown table for bench/RESULTS.md (progress goes to stderr) and writes the same numbers
as JSON (--json).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import transformers
from shared import log_uniform_lengths, write_json
from transformers import MistralModel

from nvembed_triton.engine.batching import padded_tokens, plan_batches
from nvembed_triton.engine.checkpoint import LatentAttentionSettings
from nvembed_triton.engine.nvembed_encoder import pad_right
from nvembed_triton.engine.nvembed_model import LatentAttentionPooling, NVEmbedModel, mistral_config
from nvembed_triton.testing.tiny_checkpoint import LATENT_CONFIG as TINY_LATENT_CONFIG
from nvembed_triton.testing.tiny_checkpoint import TEXT_CONFIG as TINY_TEXT_CONFIG

# The published text_config's architecture (docs/nv-embed-v2.md); mistral_config drops the sliding window.
FULL_TEXT_CONFIG = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu", "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0, "max_position_embeddings": 32768, "sliding_window": 4096,
    "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
}  # fmt: skip
FIRST_ORDINARY_ID = 3  # after <unk>, <s>, </s>
GIB = 2**30
STARTED = time.perf_counter()


def log(message: str) -> None:
    """Progress on stderr, so stdout stays the table to paste."""
    print(f"[{time.perf_counter() - STARTED:5.0f} s] {message}", file=sys.stderr, flush=True)


def build_model(text_config: dict, latent: LatentAttentionSettings, device: torch.device, dtype: torch.dtype) -> NVEmbedModel:
    """Random weights allocated on `device` in `dtype` directly: no float32 copy of 7B parameters.
    (The rotary inv_freq buffer is created in float32 explicitly, whatever the default dtype.)"""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            backbone = MistralModel(mistral_config(text_config))  # transformers' init: normal(0, 0.02)
            head = LatentAttentionPooling(latent)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        head.latents.normal_()  # allocated with torch.empty; the Linear/LayerNorm defaults are fine
    model = NVEmbedModel(backbone.eval(), head.eval())
    head.precompute_latent_keys_values()
    return model


def model_setup(parser: argparse.ArgumentParser, tiny: bool) -> tuple[torch.device, dict, LatentAttentionSettings]:
    """The device and the config to build: the published architecture on a GPU, or --tiny's."""
    if not (tiny or torch.cuda.is_available()):
        parser.error("the full-size model needs a CUDA GPU; use --tiny to check the logic on the CPU")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    latent = LatentAttentionSettings.from_config(TINY_LATENT_CONFIG if tiny else None)  # None: published defaults
    return device, TINY_TEXT_CONFIG if tiny else FULL_TEXT_CONFIG, latent


def ours_forward(model: NVEmbedModel, input_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    pool_from = torch.zeros(len(input_ids), dtype=torch.long, device=input_ids.device)  # documents: no instruction
    return model.embed(input_ids, valid, pool_from)


@torch.inference_mode()
def reference_forward(model: NVEmbedModel, input_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """One batch as the published modeling code computes it (see the module docstring)."""
    batch, length = input_ids.shape
    with torch.autocast(input_ids.device.type, dtype=torch.float16):
        dtype = model.backbone.embed_tokens.weight.dtype
        mask = torch.zeros(batch, 1, length, length, dtype=dtype, device=input_ids.device)
        mask.masked_fill_(~valid[:, None, None, :], torch.finfo(dtype).min)
        hidden = model.backbone(input_ids=input_ids, attention_mask=mask).last_hidden_state
        attention, feed_forward = model.head.cross_attend_blocks
        heads = attention.fn.heads
        latents = model.head.latents.expand(batch, -1, -1)  # repeat(latents, 'n d -> b n d')
        keys, values = attention.fn.to_kv(attention.norm_context(latents)).chunk(2, dim=-1)
        queries = attention.fn.to_q(attention.norm(hidden))
        # rearrange 'b n (h d) -> (b h) n d' and back, as published.
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2).flatten(0, 1) for t in (queries, keys, values))
        attended = F.scaled_dot_product_attention(q, k, v).unflatten(0, (batch, heads)).transpose(1, 2).flatten(2)
        x = attention.fn.to_out(attended) + hidden
        x = feed_forward.fn.net(feed_forward.norm(x)) + x
        weights = valid.unsqueeze(-1).float()
        return F.normalize((x * weights).sum(dim=1) / weights.sum(dim=1), dim=-1)


def pad(docs: list[torch.Tensor], batch: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_right([docs[i] for i in batch])


def run(forward, model: NVEmbedModel, docs: list[torch.Tensor], plan: list[list[int]], device: torch.device) -> float:
    """Seconds to embed `docs` pass by pass; copying each result to the host waits for the GPU."""
    started = time.perf_counter()
    for batch in plan:
        input_ids, valid = pad(docs, batch)
        forward(model, input_ids.to(device), valid.to(device)).cpu()
    return time.perf_counter() - started


def run_with_peak(forward, model: NVEmbedModel, docs: list[torch.Tensor], plan: list[list[int]], device: torch.device):
    """`run`'s seconds, and the peak memory it allocated above what was already held (weights), in GiB."""
    if device.type != "cuda":
        return run(forward, model, docs, plan, device), None
    torch.cuda.reset_peak_memory_stats(device)
    held = torch.cuda.memory_allocated(device)
    seconds = run(forward, model, docs, plan, device)
    return seconds, (torch.cuda.max_memory_allocated(device) - held) / GIB


def workloads(args: argparse.Namespace) -> dict[str, list[int]]:
    rng = random.Random(args.seed)
    mixed = log_uniform_lengths(rng, args.docs_mixed)
    fixed = {f"{n} tokens": [n] * count for n, count in ((128, args.docs_128), (512, args.docs_512), (4096, args.docs_4096))}
    return {**fixed, "mixed 16..2048": mixed}


def measure_matmul_tflops(device: torch.device, size: int = 8192, repeats: int = 10) -> float:
    """This GPU's bf16 matmul rate on random data: the practical ceiling for MFU."""
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    return 2 * size**3 * repeats / (start.elapsed_time(end) / 1e3) / 1e12


def long_document(model: NVEmbedModel, tokens: int, vocab: int, device: torch.device) -> dict:
    doc = [torch.randint(FIRST_ORDINARY_ID, vocab, (tokens,))]
    try:
        run(ours_forward, model, doc, [[0]], device)  # warm-up at this shape
        seconds, extra = run_with_peak(ours_forward, model, doc, [[0]], device)
    except torch.cuda.OutOfMemoryError as error:
        return {"tokens": tokens, "ok": False, "error": str(error).splitlines()[0]}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"tokens": tokens, "ok": True, "seconds": seconds, "tokens_per_s": tokens / seconds, "peak_extra_gib": extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny test config instead (runs on CPU without a GPU)")
    parser.add_argument("--docs-128", type=int, default=256)
    parser.add_argument("--docs-512", type=int, default=128)
    parser.add_argument("--docs-4096", type=int, default=16)
    parser.add_argument("--docs-mixed", type=int, default=256)
    parser.add_argument("--max-batch-tokens", type=int, default=16384, help="ours: padded tokens per pass")
    parser.add_argument("--reference-batch-size", type=int, default=8)
    parser.add_argument("--long-tokens", type=int, default=32768, help="the single long document's length")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="nominal bf16 dense peak (H100 SXM)")
    parser.add_argument("--measured-tflops", type=float, help="bf16 matmul rate (default: measured on this GPU at start)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="default: bench/results/gpu.json (gpu-tiny.json with --tiny)")
    args = parser.parse_args()
    device, text_config, latent = model_setup(parser, args.tiny)
    vocab = text_config["vocab_size"]
    torch.manual_seed(args.seed)
    if args.measured_tflops is None:
        args.measured_tflops = measure_matmul_tflops(device) if device.type == "cuda" else 1.0
        log(f"bf16 matmul, 8192^3: {args.measured_tflops:.0f} TFLOP/s")

    # The long document runs before the baseline model exists, so its peak is the production model's alone.
    model = build_model(text_config, latent, device, torch.bfloat16)
    parameters = sum(p.numel() for p in model.parameters())
    weights_gib = torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else None
    log(f"built the bf16 model ({parameters / 1e9:.3f}B parameters) on {device}; {args.long_tokens}-token document")
    long = long_document(model, args.long_tokens, vocab, device)
    log(f"long document: {'OK' if long['ok'] else 'FAIL'}; building the fp16 reference model")
    models = {"ours": model, "reference": build_model(text_config, latent, device, torch.float16)}
    forwards = {"ours": ours_forward, "reference": reference_forward}

    rows = []
    for name, lengths in workloads(args).items():
        log(f"workload {name}: {len(lengths)} documents")
        docs = [torch.randint(FIRST_ORDINARY_ID, vocab, (n,)) for n in lengths]
        size = args.reference_batch_size
        plans = {
            "ours": plan_batches(lengths, args.max_batch_tokens),
            "reference": [list(range(i, min(i + size, len(docs)))) for i in range(0, len(docs), size)],
        }
        # The first run of each path warms it up and gives its peak memory.
        peaks = {path: run_with_peak(forwards[path], models[path], docs, plans[path], device)[1] for path in plans}
        times = {path: [] for path in plans}
        for _ in range(args.repeats):  # alternate, so drifts in clocks or load hit both paths
            for path in plans:
                times[path].append(run(forwards[path], models[path], docs, plans[path], device))
        row = {"workload": name, "documents": len(docs), "real_tokens": sum(lengths)}
        for path in plans:
            seconds = statistics.median(times[path])
            flops = 2 * parameters * row["real_tokens"] / seconds
            row[path] = {
                "passes": len(plans[path]), "padded_tokens": padded_tokens(lengths, plans[path]),
                "seconds": seconds, "runs_s": times[path], "tokens_per_s": row["real_tokens"] / seconds,
                "mfu_peak": flops / (args.peak_tflops * 1e12), "mfu_measured": flops / (args.measured_tflops * 1e12),
                "peak_extra_gib": peaks[path],
            }  # fmt: skip
        row["speedup"] = row["ours"]["tokens_per_s"] / row["reference"]["tokens_per_s"]
        rows.append(row)

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (tiny smoke test: numbers meaningless)"
    result = {
        "gpu": gpu, "torch": torch.__version__, "transformers": transformers.__version__, "tiny": args.tiny,
        "parameters": parameters, "weights_gib": weights_gib, "peak_tflops": args.peak_tflops,
        "measured_tflops": args.measured_tflops, "max_batch_tokens": args.max_batch_tokens,
        "reference_batch_size": args.reference_batch_size, "repeats": args.repeats, "workloads": rows, "long_document": long,
    }  # fmt: skip
    print_markdown(result)
    write_json(result, args.json or f"bench/results/gpu{'-tiny' if args.tiny else ''}.json")


def gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def print_markdown(r: dict) -> None:
    name = "NV-Embed-v2 (tiny config)" if r["tiny"] else "NV-Embed-v2"
    print(f"{name}, {r['parameters'] / 1e9:.3f}B parameters, random weights, on {r['gpu']}")
    print(f"torch {r['torch']}, transformers {r['transformers']}; medians of {r['repeats']} runs after a warm-up.")
    print(f"ours: bf16, passes of <= {r['max_batch_tokens']} padded tokens (production path).")
    print(
        f"ref: fp16 weights + fp16 autocast, batches of {r['reference_batch_size']} in input order padded to their longest, "
        "(B,1,L,L) mask, pooling head on all positions with the latents' keys/values recomputed per call."
    )
    print(
        f"tokens/s: real tokens. MFU = 2 x parameters x real tokens / time / peak, against {r['peak_tflops']:.0f} TFLOP/s "
        f"(nominal bf16 dense) / {r['measured_tflops']:.0f} TFLOP/s (measured matmul). Peak GiB: above the weights.\n"
    )
    print(
        "| workload | docs | real tokens | padded tokens ours / ref | ours tokens/s | ref tokens/s | speed-up "
        "| ours MFU nominal / measured | ref MFU nominal / measured | peak GiB ours / ref |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for w in r["workloads"]:
        ours, ref = w["ours"], w["reference"]
        cells = [
            w["workload"], w["documents"], w["real_tokens"], f"{ours['padded_tokens']} / {ref['padded_tokens']}",
            f"{ours['tokens_per_s']:.0f}", f"{ref['tokens_per_s']:.0f}", f"{w['speedup']:.2f}x",
            f"{ours['mfu_peak']:.1%} / {ours['mfu_measured']:.1%}", f"{ref['mfu_peak']:.1%} / {ref['mfu_measured']:.1%}",
            f"{gib(ours['peak_extra_gib'])} / {gib(ref['peak_extra_gib'])}",
        ]  # fmt: skip
        print("| " + " | ".join(str(c) for c in cells) + " |")
    long = r["long_document"]
    if long["ok"]:
        print(
            f"\n{long['tokens']}-token document (ours): OK, {long['seconds']:.2f} s, {long['tokens_per_s']:.0f} tokens/s, "
            f"peak {gib(long['peak_extra_gib'])} GiB above {gib(r['weights_gib'])} GiB of weights"
        )
    else:
        print(f"\n{long['tokens']}-token document (ours): FAIL, out of memory: {long['error']}")


if __name__ == "__main__":
    main()
