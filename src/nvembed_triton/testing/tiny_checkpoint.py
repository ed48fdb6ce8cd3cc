"""A tiny random NV-Embed-v2 checkpoint in the exact published layout: same config keys, parameter
names, fp16 safetensors shards with an index, and the real Mistral-7B v1 tokenizer (shipped by
mistral-common). Tests and demos use it where the 15.7 GB weights cannot be had.

    python -m nvembed_triton.testing.tiny_checkpoint DIR [--seed N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from importlib.resources import files
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, normalizers

from nvembed_triton.engine.checkpoint import WEIGHTS_INDEX
from nvembed_triton.engine.fused_mistral import BACKBONE_PREFIX
from nvembed_triton.engine.nvembed_model import HEAD_PREFIX

HIDDEN = 64
LAYERS = 2
TEXT_CONFIG = {
    "model_type": "bidir_mistral", "architectures": ["MistralModel"], "_name_or_path": "nvidia/NV-Embed-v2",
    "vocab_size": 32000, "hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN, "num_hidden_layers": LAYERS,
    "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu", "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0, "max_position_embeddings": 32768, "sliding_window": 4096,
    "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "attention_dropout": 0.0,
    "initializer_range": 0.02, "torch_dtype": "float16",
}  # fmt: skip
# num_cross_heads is left out on purpose: loaders must fall back to the published default (8).
LATENT_CONFIG = {
    "model_type": "latent_attention",
    "num_latents_value": 16,
    "cross_dim_head": 16,
    "hidden_dim": HIDDEN,
    "latent_dim": HIDDEN,
}
CONFIG = {
    "architectures": ["NVEmbedModel"], "model_type": "nvembed", "_name_or_path": "nvidia/NV-Embed-v2",
    "auto_map": {"AutoConfig": "configuration_nvembed.NVEmbedConfig", "AutoModel": "modeling_nvembed.NVEmbedModel"},
    "add_eos": True, "add_pad_token": True, "is_mask_instruction": True, "mask_type": "b", "padding_side": "right",
    "hidden_size": HIDDEN, "latent_attention_config": LATENT_CONFIG, "text_config": TEXT_CONFIG,
    "torch_dtype": "float16", "transformers_version": "4.42.4",
}  # fmt: skip
TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": True,
    "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
    "padding_side": "right", "model_max_length": 32768, "clean_up_tokenization_spaces": False,
}  # fmt: skip
SPECIAL_TOKENS_MAP = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
NUM_CROSS_HEADS_DEFAULT = 8


def sized_config(hidden: int, layers: int) -> dict:
    """The config with another width and depth (for benchmarks where compute should dominate)."""
    text = {**TEXT_CONFIG, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers}
    latent = {**LATENT_CONFIG, "hidden_dim": hidden, "latent_dim": hidden}
    return {**CONFIG, "hidden_size": hidden, "text_config": text, "latent_attention_config": latent}


# Keys of `text_config` that describe the file rather than the network.
_NON_ARCHITECTURE_KEYS = {"model_type", "architectures", "_name_or_path", "torch_dtype", "dtype", "auto_map"}


def mistral_config(text_config: dict):
    """transformers' MistralConfig of a text_config: its MistralModel makes the random weights (its
    initialisation, and the checkpoint's tensor names); serving reads them with fused_mistral.py."""
    from transformers import MistralConfig

    return MistralConfig(**{k: v for k, v in text_config.items() if k not in _NON_ARCHITECTURE_KEYS})


def random_state_dict(config: dict, seed: int) -> dict[str, torch.Tensor]:
    from transformers import MistralModel

    torch.manual_seed(seed)
    backbone = MistralModel(mistral_config(config["text_config"]))
    state = {BACKBONE_PREFIX + name: tensor for name, tensor in backbone.state_dict().items()}
    latent, hidden = config["latent_attention_config"], config["hidden_size"]
    inner = NUM_CROSS_HEADS_DEFAULT * latent["cross_dim_head"]
    head_shapes = {
        "latents": (latent["num_latents_value"], hidden),
        "cross_attend_blocks.0.fn.to_q.weight": (inner, hidden),
        "cross_attend_blocks.0.fn.to_kv.weight": (2 * inner, hidden),
        "cross_attend_blocks.0.fn.to_out.weight": (hidden, inner),
        "cross_attend_blocks.1.fn.net.0.weight": (hidden * 8, hidden),
        "cross_attend_blocks.1.fn.net.0.bias": (hidden * 8,),
        "cross_attend_blocks.1.fn.net.2.weight": (hidden, hidden * 4),
        "cross_attend_blocks.1.fn.net.2.bias": (hidden,),
    }
    for name, shape in head_shapes.items():
        scale = 1.0 if name == "latents" else shape[-1] ** -0.5
        state[HEAD_PREFIX + name] = torch.randn(shape) * scale
    for norm in ("cross_attend_blocks.0.norm", "cross_attend_blocks.0.norm_context", "cross_attend_blocks.1.norm"):
        # Non-trivial affine parameters, so a loader that skips them is caught.
        state[f"{HEAD_PREFIX}{norm}.weight"] = 1 + 0.1 * torch.randn(hidden)
        state[f"{HEAD_PREFIX}{norm}.bias"] = 0.1 * torch.randn(hidden)
    return {name: tensor.to(torch.float16).contiguous() for name, tensor in state.items()}


def write_weights(state: dict[str, torch.Tensor], out: Path, shards: int = 2) -> None:
    """fp16 shards named and indexed as the published snapshot's are."""
    names = sorted(state)
    weight_map = {}
    for number in range(1, shards + 1):
        shard_names = names[number - 1 :: shards]
        filename = f"model-{number:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n] for n in shard_names}, out / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard_names, filename))
    total_size = sum(t.numel() * t.element_size() for t in state.values())
    (out / WEIGHTS_INDEX).write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2))


def write_tokenizer(out: Path) -> None:
    """The Mistral-7B v1 sentencepiece model, plus a tokenizer.json in the published (legacy Llama)
    layout: a Prepend("▁") + Replace(" ", "▁") normaliser and no pre-tokeniser."""
    from transformers import AutoTokenizer

    try:
        spm_model = files("mistral_common") / "data" / "tokenizer.model.v1"
    except ModuleNotFoundError:
        raise SystemExit(
            "the tiny checkpoint takes its tokenizer from mistral-common, which is not installed: "
            "pip install 'nvembed-triton[demo]' (./setup.sh installs it)"
        ) from None
    shutil.copyfile(str(spm_model), out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP, indent=2))
    # Converted in a folder of its own: next to config.json, transformers would look for remote code.
    with tempfile.TemporaryDirectory() as scratch:
        for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copyfile(out / name, Path(scratch) / name)
        AutoTokenizer.from_pretrained(scratch).save_pretrained(scratch)
        tokenizer = Tokenizer.from_file(str(Path(scratch) / "tokenizer.json"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.pre_tokenizer = None
    tokenizer.save(str(out / "tokenizer.json"))


def write_tiny_checkpoint(out: str | Path, seed: int = 0, hidden: int = HIDDEN, layers: int = LAYERS) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = sized_config(hidden, layers)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    write_weights(random_state_dict(config, seed), out)
    write_tokenizer(out)
    for path in out.iterdir():  # safetensors writes mode 600: a server running as another user could not read it
        path.chmod(0o644)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", help="where to write the checkpoint (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    parser.add_argument("--hidden", type=int, default=HIDDEN, help="hidden size (a multiple of 4)")
    parser.add_argument("--layers", type=int, default=LAYERS, help="decoder layers")
    args = parser.parse_args()
    print(write_tiny_checkpoint(args.directory, args.seed, args.hidden, args.layers))


if __name__ == "__main__":
    main()
