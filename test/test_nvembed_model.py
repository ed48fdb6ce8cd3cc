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
from nvembed_triton.protocol.settings import EncoderSettings

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


@pytest.mark.parametrize("mask", [None, torch.ones(1, 1, 1, 5, dtype=torch.bool)], ids=["no mask", "4-D mask"])
def test_attention_is_bidirectional(encoder, mask):
    """The first token's state must depend on the last token, on both paths embed() uses:
    transformers keeps Mistral causal unless our flags and masks take effect, and those internals
    move between releases."""
    backbone = encoder.model.backbone
    ids = torch.tensor([[1, 1318, 2245, 5374, 2]])
    changed = ids.clone()
    changed[0, 3] = 1602
    with torch.inference_mode():
        first = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[0, 0]
        second = backbone(input_ids=changed, attention_mask=mask, use_cache=False).last_hidden_state[0, 0]
    assert (first - second).abs().max() > 1e-3


def test_unpadded_and_padded_passes_agree(encoder):
    """A pass without padding takes the mask-free path; it must equal the masked one."""
    texts = encoder.tokenizer.encode(["same length one", "same length two"], ["", ""])
    assert len(texts[0].ids) == len(texts[1].ids)
    unpadded = encoder.embed_tokenized(texts)
    padded = encoder.embed_tokenized(texts + encoder.tokenizer.encode(["a longer text " * 5], [""]))[:2]
    assert np.abs(unpadded - padded).max() < 1e-5


def test_no_kv_cache_is_built(encoder):
    """An embedding is one pass: a key/value cache would only hold memory. Called as transformers
    callers do, without use_cache, the backbone must return none."""
    with torch.inference_mode():
        output = encoder.model.backbone(input_ids=torch.tensor([[1, 1318, 2245, 2]]))
    assert output.past_key_values is None


def test_padding_does_not_leak_into_the_embedding(encoder):
    short = encoder.tokenizer.encode(["short text"], [""])
    long = encoder.tokenizer.encode(["a much longer text " * 10], [""])
    alone = encoder.embed_tokenized(short)
    padded = encoder.embed_tokenized(long + short)[1:]
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


def test_weights_load_in_the_requested_dtype(tiny_checkpoint):
    encoder = encoder_for(tiny_checkpoint, dtype="fp16")
    assert {p.dtype for p in encoder.model.parameters()} == {torch.float16}


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
