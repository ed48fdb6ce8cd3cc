"""Choosing and loading the text encoder a model directory holds."""

from __future__ import annotations

import torch

from nvembed_triton.engine.checkpoint import Architecture, check_model_dir
from nvembed_triton.engine.compiled import ensure_compile_cache
from nvembed_triton.engine.text_encoder import TextEncoder
from nvembed_triton.settings import EncoderSettings, SettingsError


def check_device_available(device: str) -> None:
    """A GPU asked for but absent is a load error, never a silent fall back to the CPU."""
    if device == "cpu":
        return
    index = int(device.split(":")[1])
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= available:
        raise SettingsError(
            f"device {device} was asked for but torch sees {available} CUDA device(s) "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
            'set device to "cpu" (NVEMBED_DEVICE=cpu) or run where the GPU is visible'
        )


def load_encoder(settings: EncoderSettings) -> TextEncoder:
    check_device_available(settings.device)
    ensure_compile_cache()
    architecture = check_model_dir(settings.model_dir)
    if settings.stand_in:  # benchmarks only: NV-Embed-v2's tokenizer, no network
        from nvembed_triton.engine.stand_in import ConstantEncoder

        return ConstantEncoder(settings)
    if architecture is Architecture.NV_EMBED_V2:
        from nvembed_triton.engine.nvembed_encoder import NVEmbedEncoder

        return NVEmbedEncoder(settings)
    from nvembed_triton.engine.st_encoder import SentenceTransformerEncoder  # sentence-transformers is imported only when needed

    return SentenceTransformerEncoder(settings)
