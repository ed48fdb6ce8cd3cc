"""The package's NV-Embed-v2 forward, in process, against the independent reference; plus guards
on transformers internals that the bidirectional backbone relies on."""

import shutil

import numpy as np
import pytest
import torch
from grpc_helpers import cosine
from nvembed_reference import ReferenceNVEmbed

from nvembed_triton.engine.encoders import load_encoder
from nvembed_triton.protocol.contract import RETRIEVAL_TASK, nvembed_query_instruction
from nvembed_triton.protocol.options import TextOptions
from nvembed_triton.settings import EncoderSettings

INSTRUCTION = nvembed_query_instruction(RETRIEVAL_TASK)
TEXTS = ["How do neural networks learn?", "x", "Market prices are set by supply and demand. " * 12, "café 🙂 中文"]


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return ReferenceNVEmbed(tiny_checkpoint)


def encoder_for(tiny_checkpoint, **parameters):
    return load_encoder(EncoderSettings.from_parameters({"model_dir": str(tiny_checkpoint), "device": "cpu", **parameters}))


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint):
    return encoder_for(tiny_checkpoint)


@pytest.mark.parametrize("instruction", ["", INSTRUCTION])
def test_fp32_matches_the_reference(encoder, reference, instruction):
    ours = encoder.encode(TEXTS, TextOptions.each(len(TEXTS), instruction=instruction)).embeddings
    expected = np.stack([reference.embed(t, instruction) for t in TEXTS])
    assert np.abs(ours - expected).max() < 1e-5
    assert np.all(cosine(ours, expected) >= 0.99999)


def test_bf16_stays_close_to_fp32(tiny_checkpoint, reference):
    ours = encoder_for(tiny_checkpoint, dtype="bf16").encode(TEXTS, TextOptions.each(len(TEXTS))).embeddings
    expected = np.stack([reference.embed(t) for t in TEXTS])
    assert np.all(cosine(ours, expected) >= 0.99)


@pytest.mark.parametrize("layout", ["padded, no mask", "padded, key mask", "packed"])
def test_attention_is_bidirectional(encoder, layout):
    """The first token's state must depend on the last token, on every path embed() uses."""
    from nvembed_triton.engine.fused_mistral import Attention

    backbone = encoder.model.backbone
    ids = torch.tensor([1, 1318, 2245, 5374, 2])
    changed = ids.clone()
    changed[3] = 1602
    positions = torch.arange(5)
    attend = {
        "padded, no mask": Attention.padded(torch.ones(1, 5, dtype=torch.bool), masked=False),
        "padded, key mask": Attention.padded(torch.ones(1, 5, dtype=torch.bool)),
        "packed": Attention.packed(torch.tensor([0, 5], dtype=torch.int32), 5),
    }[layout]
    shape = (5,) if layout == "packed" else (1, 5)
    with torch.inference_mode():
        first = backbone(ids.view(shape), positions.view(shape), attend).reshape(5, -1)[0]
        second = backbone(changed.view(shape), positions.view(shape), attend).reshape(5, -1)[0]
    assert (first - second).abs().max() > 1e-3


def test_unpadded_and_padded_passes_agree(encoder):
    """A pass without padding takes the mask-free path; it must equal the masked one."""
    texts = encoder.tokenizer.encode(["same length one", "same length two"], ["", ""])
    assert len(texts[0].ids) == len(texts[1].ids)
    unpadded = encoder.embed_tokenized(texts)[0]
    padded = encoder.embed_tokenized(texts + encoder.tokenizer.encode(["a longer text " * 5], [""]))[0][:2]
    assert np.abs(unpadded - padded).max() < 1e-5


def test_padding_does_not_leak_into_the_embedding(encoder):
    short = encoder.tokenizer.encode(["short text"], [""])
    long = encoder.tokenizer.encode(["a much longer text " * 10], [""])
    alone = encoder.embed_tokenized(short)[0]
    padded = encoder.embed_tokenized(long + short)[0][1:]
    assert np.abs(alone - padded).max() < 1e-5


def test_precomputed_latent_keys_values_equal_per_call_ones(encoder):
    head = encoder.model.head
    block = head.cross_attend_blocks[0]
    with torch.inference_mode():
        keys, values = block.fn.to_kv(block.norm_context(head.latents)).chunk(2, dim=-1)
    heads, dim_head = block.fn.heads, block.fn.dim_head
    assert head.latent_keys.shape == (heads, head.latents.shape[0], dim_head)
    assert torch.equal(head.latent_keys, keys.view(-1, heads, dim_head).transpose(0, 1))
    assert torch.equal(head.latent_values, values.view(-1, heads, dim_head).transpose(0, 1))


def test_default_num_cross_heads_is_used_when_the_config_omits_it(encoder):
    assert encoder.model.head.cross_attend_blocks[0].fn.heads == 8


def test_weights_load_in_the_requested_dtype_with_projections_fused(tiny_checkpoint):
    encoder = encoder_for(tiny_checkpoint, dtype="fp16")
    assert {p.dtype for p in encoder.model.parameters()} == {torch.float16}
    layer, shape = encoder.model.backbone.layers[0], encoder.model.backbone.shape
    assert layer.qkv.weight.shape == ((shape.heads + 2 * shape.kv_heads) * shape.head_dim, shape.hidden)
    assert layer.gate_up.weight.shape == (2 * shape.intermediate, shape.hidden)
    # Fused, not doubled: the backbone holds exactly the checkpoint's backbone parameters.
    from safetensors import safe_open

    from nvembed_triton.engine.checkpoint import weight_files
    from nvembed_triton.engine.fused_mistral import BACKBONE_PREFIX

    stored = 0
    for path in weight_files(tiny_checkpoint):
        with safe_open(path, framework="pt") as shard:
            stored += sum(int(np.prod(shard.get_slice(n).get_shape())) for n in shard.keys() if n.startswith(BACKBONE_PREFIX))
    assert sum(p.numel() for p in encoder.model.backbone.parameters()) == stored


def test_the_snapshots_own_python_files_never_run(tiny_checkpoint, tmp_path, reference):
    """The published snapshot ships modeling_nvembed.py and configuration_nvembed.py, named by its
    config's auto_map. Here they leave a marker if imported: loading must not import them."""
    snapshot = shutil.copytree(tiny_checkpoint, tmp_path / "snapshot")
    marker = tmp_path / "remote-code-ran"
    for module in ("modeling_nvembed.py", "configuration_nvembed.py"):
        (snapshot / module).write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    assert "auto_map" in (snapshot / "config.json").read_text()
    ours = encoder_for(snapshot).encode(TEXTS, TextOptions.each(len(TEXTS))).embeddings
    assert not marker.exists()
    assert np.all(cosine(ours, np.stack([reference.embed(t) for t in TEXTS])) >= 0.99999)
