"""What a local model directory holds: its architecture, its NV-Embed-v2 settings, and whether it
is complete, and under which names it may be served. No torch here: serve.sh checks a directory
with this before tritonserver starts, and the encoder before any weight loads."""

from __future__ import annotations

import enum
import json
import math
import os
import struct
import sys
from collections.abc import Collection
from dataclasses import dataclass, fields
from pathlib import Path

from nvembed_triton.protocol.contract import PUBLIC_MODEL


class Architecture(enum.Enum):
    """Which kind of model a directory holds: the one name for it everywhere."""

    NV_EMBED_V2 = "NV-Embed-v2"
    SENTENCE_TRANSFORMERS = "sentence-transformers"
    STAND_IN = "constant stand-in (benchmark only)"  # settings' stand_in; see stand_in.py


NVEMBED_MODEL_TYPE = "nvembed"  # config.json's model_type in an NV-Embed-v2 snapshot

WEIGHTS_INDEX = "model.safetensors.index.json"
SINGLE_WEIGHTS = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"

HOW_TO_GET_WEIGHTS = (
    "Download the snapshot (about 15.7 GB) on a machine with network access, e.g. "
    "`huggingface-cli download nvidia/NV-Embed-v2 --local-dir /models/NV-Embed-v2`, "
    "then point NVEMBED_MODEL_DIR (or the model_dir parameter) at it. "
    "To try the stack without it, run ./demo.sh."
)
# The safetensors library refuses longer headers too; a larger length means the first 8 bytes are garbage.
MAX_HEADER_BYTES = 100_000_000
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2,
    "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


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
    """A JSON file of a snapshot; one that is not JSON (or not UTF-8) is named, in one line."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError alike
        raise damaged(path, f"is not valid JSON ({error})") from None


def detect_architecture(model_dir: str | Path) -> Architecture:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory {str(model_dir)!r} does not exist. {HOW_TO_GET_WEIGHTS}")
    config_path = model_dir / "config.json"
    if config_path.is_file() and read_json(config_path).get("model_type") == NVEMBED_MODEL_TYPE:
        return Architecture.NV_EMBED_V2
    if (model_dir / "modules.json").is_file() or (model_dir / "config_sentence_transformers.json").is_file():
        return Architecture.SENTENCE_TRANSFORMERS
    raise CheckpointError(
        f"{str(model_dir)!r} is neither an NV-Embed-v2 snapshot (config.json with model_type "
        f"{NVEMBED_MODEL_TYPE!r}) nor a sentence-transformers model (modules.json). {HOW_TO_GET_WEIGHTS}"
    )


def damaged(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(
        f"{path} {problem}. Re-download that file, e.g. "
        f"`huggingface-cli download nvidia/NV-Embed-v2 {path.name} --local-dir {path.parent}`."
    )


def read_weight_map(index: Path) -> dict[str, str]:
    """The index's tensor name -> shard file map; a damaged index is named rather than a KeyError."""
    try:
        weight_map = read_json(index).get("weight_map")
    except (ValueError, AttributeError):  # invalid JSON, or JSON that is not an object
        weight_map = None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise damaged(index, "is not a valid safetensors index (no weight_map of tensor name -> file)")
    return weight_map


def shard_contents(model_dir: Path) -> dict[Path, set[str]]:
    """Each safetensors file of a snapshot with the tensors the index puts in it (none named for
    a single model.safetensors, which has no index)."""
    index = model_dir / WEIGHTS_INDEX
    if not index.is_file():
        return {model_dir / SINGLE_WEIGHTS: set()}
    contents: dict[Path, set[str]] = {}
    for name, shard in sorted(read_weight_map(index).items(), key=lambda item: item[1]):
        contents.setdefault(model_dir / shard, set()).add(name)
    return contents


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a snapshot: the shards named by the index, or the single file."""
    return list(shard_contents(model_dir))


def read_safetensors_header(path: Path) -> tuple[dict, int, int]:
    """The JSON header of a safetensors file, where its data section starts, and the file size.
    Reads the header only: a 5 GB shard is checked in microseconds."""
    if not path.is_file():
        raise damaged(path, "does not exist")
    size = path.stat().st_size
    if size < 8:
        raise damaged(path, f"is truncated: {size} bytes, too short to hold the 8-byte header length")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > MAX_HEADER_BYTES:
            raise damaged(path, f"has a corrupt header: it claims {header_len} header bytes (the limit is {MAX_HEADER_BYTES})")
        if 8 + header_len > size:
            raise damaged(path, f"is truncated or corrupt: {size} bytes, the header alone claims {8 + header_len}")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except ValueError as error:  # UnicodeDecodeError and JSONDecodeError alike
        raise damaged(path, f"has a corrupt header: not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise damaged(path, "has a corrupt header: not a JSON object")
    return header, 8 + header_len, size


def is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def tensor_span(path: Path, name: str, entry) -> tuple[int, int]:
    """A tensor's [begin, end) in the data section, once its byte size matches dtype x shape."""
    spec = entry if isinstance(entry, dict) else {}
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not (
        isinstance(dtype, str)
        and isinstance(shape, list)
        and all(map(is_count, shape))
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(map(is_count, offsets))
        and offsets[0] <= offsets[1]
    ):
        raise damaged(path, f"has a corrupt header: tensor {name!r} has a malformed entry {str(entry)[:200]}")
    begin, end = offsets
    # Unknown dtypes (newer safetensors) are left to the loader rather than refused here.
    needed = DTYPE_BYTES[dtype] * math.prod(shape) if dtype in DTYPE_BYTES else end - begin
    if needed != end - begin:
        raise damaged(
            path,
            f"has a corrupt header: tensor {name!r} is {dtype} {shape} ({needed} bytes) "
            f"but its data_offsets [{begin}, {end}] span {end - begin} bytes",
        )
    return begin, end


def check_safetensors_file(path: Path, expected_tensors: Collection[str] = ()) -> None:
    """CheckpointError naming `path` unless its header is consistent with its size and holds
    `expected_tensors`: a truncated or padded download fails here, not halfway through loading."""
    header, data_start, size = read_safetensors_header(path)
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise damaged(path, "has a corrupt header: __metadata__ is not a map of strings")
    # The loader wants tensors packed back to back from byte 0: a gap or overlap is a corrupt header.
    data_end = 0
    for (begin, end), name in sorted((tensor_span(path, name, entry), name) for name, entry in header.items()):
        if begin != data_end:
            raise damaged(path, f"has a corrupt header: tensor {name!r} starts at data byte {begin}, not at {data_end}")
        data_end = end
    if size < data_start + data_end:
        raise damaged(path, f"is truncated: {size} bytes, the header needs {data_start + data_end}")
    if size > data_start + data_end:
        raise damaged(
            path,
            f"has {size - data_start - data_end} extra bytes after the tensor data: {size} bytes, "
            f"the header accounts for {data_start + data_end}",
        )
    missing = sorted(set(expected_tensors) - header.keys())
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise damaged(path, f"lacks {len(missing)} tensor(s) that {WEIGHTS_INDEX} puts in it: {shown}")


def check_weight_files(model_dir: str | Path) -> None:
    """Every safetensors file of an NV-Embed-v2 snapshot is whole (headers only; no tensor is read)."""
    for path, expected in shard_contents(Path(model_dir)).items():
        check_safetensors_file(path, expected)


def missing_nvembed_files(model_dir: str | Path) -> list[str]:
    """Files an NV-Embed-v2 snapshot needs that `model_dir` lacks (empty when complete)."""
    model_dir = Path(model_dir)
    needed = [model_dir / "config.json", model_dir / TOKENIZER_FILE]
    if (model_dir / WEIGHTS_INDEX).is_file() or (model_dir / SINGLE_WEIGHTS).is_file():
        needed += weight_files(model_dir)
    else:
        needed.append(model_dir / WEIGHTS_INDEX)
    return [p.name for p in needed if not p.is_file()]


def check_model_dir(model_dir: str | Path) -> Architecture:
    """The architecture of a servable directory, or CheckpointError naming what is missing, damaged
    or unreadable (the container runs as uid 1000: a snapshot written by root with mode 600, as
    safetensors writes its files, cannot be read there)."""
    try:
        architecture = detect_architecture(model_dir)
        if architecture is Architecture.NV_EMBED_V2:
            missing = missing_nvembed_files(model_dir)
            if missing:
                raise CheckpointError(
                    f"NV-Embed-v2 snapshot {str(model_dir)!r} is incomplete: missing {', '.join(missing)}. {HOW_TO_GET_WEIGHTS}"
                )
            check_weight_files(model_dir)
    except PermissionError as error:
        raise CheckpointError(
            f"cannot read {error.filename} as uid {os.getuid()}: make the snapshot readable by the server "
            f"(chmod -R a+rX {model_dir})"
        ) from None
    return architecture


def check_served_name(model_name: str, architecture: Architecture) -> None:
    """Clients trust the name: another model must never answer as nv-embed-v2."""
    if model_name.startswith(PUBLIC_MODEL) and architecture is not Architecture.NV_EMBED_V2:
        raise CheckpointError(
            f"this is a {architecture.value} model, not NV-Embed-v2, so it cannot be served as "
            f"{model_name!r}; serve it under its own name, e.g. ./serve.sh --name my-model --model-dir DIR"
        )


def main(argv: list[str]) -> int:
    """`python -m nvembed_triton.engine.checkpoint DIR`: print the architecture, or why DIR can't be served."""
    if len(argv) != 1:
        print("usage: python -m nvembed_triton.engine.checkpoint MODEL_DIR", file=sys.stderr)
        return 2
    try:
        print(check_model_dir(argv[0]).value)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
