"""Exports a local sentence-transformers model's transformer (its last_hidden_state, batch and length
dynamic) to ONNX with torch's exporter, for Infinity's ONNX engine in bench_peers.py. Runs in
Infinity's own venv (its transformers), so it imports nothing of this project:

    VENV/bin/python bench/onnx_export.py MODEL_DIR OUT.onnx

torch's own exporter needs nothing beyond what Infinity's venv has (onnx, torch, transformers)."""

import sys
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

model_dir, out = sys.argv[1], Path(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
# Two texts of different lengths: the traced graph holds the padding path.
example = tokenizer(["a short text", "a somewhat longer text, so that the batch is padded"], padding=True, return_tensors="pt")
names = [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in example]
axes = {name: {0: "batch", 1: "sequence"} for name in [*names, "last_hidden_state"]}
out.parent.mkdir(parents=True, exist_ok=True)
with torch.no_grad():
    torch.onnx.export(
        model, tuple(example[name] for name in names), str(out), input_names=names,
        output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=17, dynamo=False,
    )  # fmt: skip
