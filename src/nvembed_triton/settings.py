"""Operator knobs: read once from config.pbtxt `parameters`, overridden by NVEMBED_* environment
variables (what serve.sh sets), and checked before any weight is loaded."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

DTYPE_NAMES = {
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "fp32": "float32", "float32": "float32", "float": "float32",
}  # fmt: skip


class SettingsError(ValueError):
    """A configuration that cannot work; the model refuses to load and says why."""


def triton_parameters(model_config: Mapping) -> dict[str, str]:
    """config.pbtxt `parameters { key: K value { string_value: V } }` as a plain dict."""
    return {key: value["string_value"] for key, value in model_config.get("parameters", {}).items()}


def overridden(parameters: Mapping[str, str], environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Parameters with NVEMBED_<KEY> environment variables applied (NVEMBED_DEVICE -> device)."""
    merged = dict(parameters)
    for key in set(parameters) | {"model_dir", "device", "dtype", "max_length", "max_batch_tokens"}:
        value = environ.get(f"NVEMBED_{key.upper()}")
        if value:
            merged[key] = value
    return merged


def positive_int(parameters: Mapping[str, str], key: str, default: int) -> int:
    raw = parameters.get(key, "") or str(default)
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"parameter {key} must be a positive integer, got {raw!r}") from None
    if value < 1:
        raise SettingsError(f"parameter {key} must be a positive integer, got {value}")
    return value


@dataclass(frozen=True)
class EncoderSettings:
    model_dir: str
    device: str  # "cpu" or "cuda:N"
    dtype: str  # a torch dtype name
    max_length: int
    max_batch_tokens: int

    @classmethod
    def from_parameters(
        cls, parameters: Mapping[str, str], instance_kind: str = "", instance_device_id: str = "0"
    ) -> EncoderSettings:
        model_dir = parameters.get("model_dir", "")
        if not model_dir:
            raise SettingsError("no model directory: set parameter model_dir in config.pbtxt or NVEMBED_MODEL_DIR")
        device = resolve_device(parameters.get("device", "") or "cuda:0", instance_kind, instance_device_id)
        return cls(
            model_dir=model_dir,
            device=device,
            dtype=resolve_dtype(parameters.get("dtype", "") or "auto", device),
            max_length=positive_int(parameters, "max_length", 32768),
            max_batch_tokens=positive_int(parameters, "max_batch_tokens", 16384),
        )


def resolve_device(requested: str, instance_kind: str, instance_device_id: str) -> str:
    """The device to load on. A KIND_GPU instance uses the GPU Triton gave it; "cuda" alone means
    cuda:0. Whether that GPU exists is checked by check_device_available, at load time."""
    requested = requested.strip().lower()
    if instance_kind.upper() in ("GPU", "KIND_GPU"):
        if requested == "cpu":
            raise SettingsError('instance_group is KIND_GPU but parameter device is "cpu"; use KIND_CPU to run on the CPU')
        return f"cuda:{instance_device_id}"
    if requested == "cpu":
        return "cpu"
    if requested == "cuda":
        return "cuda:0"
    if requested.startswith("cuda:") and requested[5:].isdigit():
        return requested
    raise SettingsError(f'parameter device must be "cpu", "cuda" or "cuda:N", got {requested!r}')


def resolve_dtype(requested: str, device: str) -> str:
    """float16 on GPUs: NV-Embed-v2 is published in fp16 and measured at full size it stays 100x
    closer to fp32 than bf16 does, for 3-4% of throughput (bench/RESULTS.md). float32 on CPUs
    (16-bit matmuls are slow on most CPUs)."""
    requested = requested.strip().lower()
    if requested == "auto":
        return "float32" if device == "cpu" else "float16"
    if requested not in DTYPE_NAMES:
        raise SettingsError(f"parameter dtype must be one of auto, bf16, fp16, fp32, got {requested!r}")
    return DTYPE_NAMES[requested]


def check_served_name(model_name: str, architecture: str, nvembed_architecture: str = "NV-Embed-v2") -> None:
    """Clients trust the name: another model must never answer as nv-embed-v2."""
    from .contract import PUBLIC_MODEL

    if model_name.startswith(PUBLIC_MODEL) and architecture != nvembed_architecture:
        raise SettingsError(
            f"the model directory holds a {architecture} model, not NV-Embed-v2, so it cannot be served as "
            f"{model_name!r}; serve it under its own name, e.g. ./serve.sh --name my-model --model-dir DIR"
        )
