import json
import shutil

import pytest
import torch
from safetensors import safe_open

from nvembed_triton.checkpoint import (
    NVEMBED,
    SENTENCE_TRANSFORMERS,
    CheckpointError,
    LatentAttentionSettings,
    check_model_dir,
    missing_nvembed_files,
)
from nvembed_triton.serve import demo_model_dir


def test_published_config_falls_back_to_the_official_latent_attention_defaults():
    settings = LatentAttentionSettings.from_config({"model_type": "latent_attention"})
    assert settings == LatentAttentionSettings(
        num_latents_value=512, num_cross_heads=8, cross_dim_head=4096, hidden_dim=4096, latent_dim=4096
    )


def test_tiny_checkpoint_has_the_published_layout(tiny_checkpoint):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["model_type"] == "nvembed" and config["architectures"] == ["NVEmbedModel"]
    assert config["text_config"]["model_type"] == "bidir_mistral"
    assert "num_cross_heads" not in config["latent_attention_config"]  # exercises the default
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    assert "embedding_model.layers.1.self_attn.k_proj.weight" in names
    assert "latent_attention_model.cross_attend_blocks.0.fn.to_kv.weight" in names
    assert "latent_attention_model.cross_attend_blocks.1.fn.net.2.bias" in names
    assert len(set(index["weight_map"].values())) == 2
    for shard in set(index["weight_map"].values()):
        with safe_open(tiny_checkpoint / shard, framework="pt") as f:
            assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.float16}
    assert {"tokenizer.json", "tokenizer.model", "tokenizer_config.json"} <= {p.name for p in tiny_checkpoint.iterdir()}


def test_architecture_is_detected(tiny_checkpoint):
    assert check_model_dir(tiny_checkpoint) == NVEMBED
    assert check_model_dir(demo_model_dir()) == SENTENCE_TRANSFORMERS


def test_missing_shard_is_named(tiny_checkpoint, tmp_path):
    copy = shutil.copytree(tiny_checkpoint, tmp_path / "copy")
    (copy / "model-00002-of-00002.safetensors").unlink()
    assert missing_nvembed_files(copy) == ["model-00002-of-00002.safetensors"]
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        check_model_dir(copy)


def test_absent_directory_says_how_to_get_the_weights(tmp_path):
    with pytest.raises(CheckpointError, match="huggingface-cli download nvidia/NV-Embed-v2"):
        check_model_dir(tmp_path / "nowhere")


def test_unknown_directory_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match="neither"):
        check_model_dir(tmp_path)
