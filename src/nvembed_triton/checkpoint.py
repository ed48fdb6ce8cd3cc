"""What a local model directory holds: its architecture, its NV-Embed-v2 settings, and whether it
is complete. No torch here: serve.sh and the front model use this before anything heavy loads."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path

NVEMBED = "nvembed"
SENTENCE_TRANSFORMERS = "sentence-transformers"

WEIGHTS_INDEX = "model.safetensors.index.json"
SINGLE_WEIGHTS = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"

HOW_TO_GET_WEIGHTS = (
    "Download the snapshot (about 15.7 GB) on a machine with network access, e.g. "
    "`huggingface-cli download nvidia/NV-Embed-v2 --local-dir /models/NV-Embed-v2`, "
    "then point NVEMBED_MODEL_DIR (or the model_dir parameter) at it. "
    "To try the stack without it, run ./demo.sh."
)


class CheckpointError(ValueError):
    """The model directory cannot be served; the message says what is missing."""


@dataclass(frozen=True)
class LatentAttentionSettings:
    """NV-Embed-v2's pooling head. The published config.json stores only `model_type`, so every
    field falls back to the defaults of the published configuration class."""

    num_latents_value: int = 512
    num_cross_heads: int = 8
    cross_dim_head: int = 4096
    hidden_dim: int = 4096
    latent_dim: int = 4096

    @classmethod
    def from_config(cls, latent_config: dict | None) -> LatentAttentionSettings:
        given = latent_config or {}
        return cls(**{f.name: int(given[f.name]) for f in fields(cls) if f.name in given})


def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def detect_architecture(model_dir: str | Path) -> str:
    """NVEMBED for an NV-Embed-v2 snapshot, SENTENCE_TRANSFORMERS for a sentence-transformers one."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory {str(model_dir)!r} does not exist. {HOW_TO_GET_WEIGHTS}")
    config_path = model_dir / "config.json"
    if config_path.is_file() and read_json(config_path).get("model_type") == NVEMBED:
        return NVEMBED
    if (model_dir / "modules.json").is_file() or (model_dir / "config_sentence_transformers.json").is_file():
        return SENTENCE_TRANSFORMERS
    raise CheckpointError(
        f"{str(model_dir)!r} is neither an NV-Embed-v2 snapshot (config.json with model_type "
        f"'nvembed') nor a sentence-transformers model (modules.json). {HOW_TO_GET_WEIGHTS}"
    )


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a snapshot: the shards named by the index, or the single file."""
    index = model_dir / WEIGHTS_INDEX
    if index.is_file():
        shards = sorted(set(read_json(index)["weight_map"].values()))
        return [model_dir / shard for shard in shards]
    return [model_dir / SINGLE_WEIGHTS]


def missing_nvembed_files(model_dir: str | Path) -> list[str]:
    """Files an NV-Embed-v2 snapshot needs that `model_dir` lacks (empty when complete)."""
    model_dir = Path(model_dir)
    needed = [model_dir / "config.json", model_dir / TOKENIZER_FILE]
    if (model_dir / WEIGHTS_INDEX).is_file() or (model_dir / SINGLE_WEIGHTS).is_file():
        needed += weight_files(model_dir)
    else:
        needed.append(model_dir / WEIGHTS_INDEX)
    return [p.name for p in needed if not p.is_file()]


def check_model_dir(model_dir: str | Path) -> str:
    """The architecture of a servable directory, or CheckpointError naming what is missing."""
    architecture = detect_architecture(model_dir)
    if architecture == NVEMBED:
        missing = missing_nvembed_files(model_dir)
        if missing:
            raise CheckpointError(
                f"NV-Embed-v2 snapshot {str(model_dir)!r} is incomplete: missing {', '.join(missing)}. {HOW_TO_GET_WEIGHTS}"
            )
    return architecture


def main(argv: list[str]) -> int:
    """`python -m nvembed_triton.checkpoint DIR`: print the architecture, or why DIR can't be served."""
    if len(argv) != 1:
        print("usage: python -m nvembed_triton.checkpoint MODEL_DIR", file=sys.stderr)
        return 2
    try:
        print(check_model_dir(argv[0]))
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
