"""Is FP8 safe for your NV-Embed-v2? Embeds an operator's own texts with their weights twice, FP8
(fp8.py) and the precision it would replace, and judges by the worst text:

    python -m nvembed_triton.engine.fp8_check --model-dir DIR --texts FILE [--instruction ...]

Safe only if every text's FP8 vector is within MIN_SAFE_COSINE of its fp16 one (exit 0); else it
says NOT SAFE (exit 1). Random weights say nothing about a trained model's FP8 fidelity."""

from __future__ import annotations

import argparse
import sys

import torch

from nvembed_triton.engine.encoders import load_encoder
from nvembed_triton.protocol.options import TextOptions
from nvembed_triton.settings import EncoderSettings

MIN_SAFE_COSINE = 0.99


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Is FP8 safe for your NV-Embed-v2 weights and texts? Cosine of each "
                                     "text's FP8 vector with its fp16 vector; safe only if every one is at least "
                                     f"{MIN_SAFE_COSINE}.")  # fmt: skip
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--texts", required=True, help="a UTF-8 file, one text per line (your documents or queries)")
    parser.add_argument("--instruction", default="", help="an instruction for every text (e.g. your query prefix)")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--dtype", default="fp16", help="the precision FP8 is held against (fp16, bf16, fp32)")
    args = parser.parse_args(argv)
    texts = [line for line in open(args.texts, encoding="utf-8").read().splitlines() if line.strip()]
    if not texts:
        print(f"{args.texts} holds no texts", file=sys.stderr)
        return 2
    vectors = {}
    for fp8 in ("off", "on"):  # one model at a time on the device
        settings = EncoderSettings.from_parameters({"model_dir": args.model_dir, "device": args.device, "dtype": args.dtype,
                                                    "fp8": fp8})  # fmt: skip
        encoder = load_encoder(settings)
        vectors[fp8] = encoder.encode(texts, TextOptions.each(len(texts), instruction=args.instruction)).embeddings
        del encoder
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    cosines = (vectors["off"] * vectors["on"]).sum(axis=1)
    worst = int(cosines.argmin())
    print(f"{len(texts)} texts, FP8 vs {args.dtype}: min cosine {cosines.min():.5f} (line {worst + 1}), "
          f"median {float(sorted(cosines)[len(cosines) // 2]):.5f}, mean {cosines.mean():.5f}")  # fmt: skip
    if not cosines.min() >= MIN_SAFE_COSINE:
        print(f"NOT SAFE: FP8 moves some texts' vectors below cosine {MIN_SAFE_COSINE} of {args.dtype}; keep fp8 off")
        return 1
    print(f"safe on these texts: every FP8 vector is within cosine {MIN_SAFE_COSINE} of {args.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
