"""Choosing and loading the text encoder a model directory holds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from .checkpoint import Architecture, check_model_dir
from .settings import EncoderSettings, SettingsError

# Indices of texts about to be computed -> those still wanted (their clients have not gone).
KeepFilter = Callable[[list[int]], list[int]]


@dataclass
class Encoded:
    """An encode call's result: the vectors and what it took to make them."""

    embeddings: np.ndarray  # (N, D) unit FP32 rows; NaN rows for texts that `keep` dropped
    token_counts: np.ndarray  # (N,) int32: the tokens each text was embedded with (special ones included)
    truncated: np.ndarray  # (N,) bool: the text had more than max_length tokens and was cut
    passes: int = 0  # forward passes run
    padded_tokens: int = 0  # tokens those passes computed, padding included


class TextEncoder(Protocol):
    architecture: Architecture
    dimension: int
    max_length: int
    linear_kernels: str  # what its linear layers run on (cpu_linear.prepare_linears), for the load log

    def default_instruction(self, prompt_name: str) -> str: ...

    def check_instruction(self, instruction: str) -> None: ...

    def encode(
        self, texts: list[str], instructions: list[str], keep: KeepFilter | None = None, truncations: list[str] | None = None
    ) -> Encoded:
        """Row i for texts[i] with instructions[i]. Before each forward pass, `keep` (if given)
        receives the indices of the pass's texts and returns those still wanted. truncations: per
        text, END (default), START or NONE; a text over max_length with NONE is not computed (its
        row stays NaN, `truncated` marks it and `token_counts` holds its whole length)."""
        ...


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
    architecture = check_model_dir(settings.model_dir)
    if settings.stand_in:  # benchmarks only: NV-Embed-v2's tokenizer, no network
        from .stand_in import ConstantEncoder

        return ConstantEncoder(settings)
    if architecture is Architecture.NV_EMBED_V2:
        from .nvembed_encoder import NVEmbedEncoder

        return NVEmbedEncoder(settings)
    from .st_encoder import SentenceTransformerEncoder  # sentence-transformers is imported only when needed

    return SentenceTransformerEncoder(settings)
