"""What an encoder is: the interface the serving layer and the pass runner use (TextEncoder), its
result (Encoded), and the filter a caller passes to drop texts nobody waits for (KeepFilter).
Kept apart from encoders.py, which loads the implementations, so none of them imports its loader."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from nvembed_triton.engine.checkpoint import Architecture
from nvembed_triton.protocol.options import TextOptions

# Indices of texts about to be computed -> those still wanted (their clients have not gone).
KeepFilter = Callable[[list[int]], list[int]]


@dataclass(frozen=True)
class PassRecord:
    """One forward pass, as NV-Embed-v2's encoder ran it (for the pass log: what limits a GPU)."""

    rows: int  # texts
    tokens: int  # their tokens
    computed: int  # tokens the pass computed, padding included (a graph's whole bucket)
    path: str  # "graph RxL", "packed" or "padded"
    device_ms: float | None  # the pass's GPU time (CUDA events); None on a CPU
    wall_ms: float  # from the host's first step to the vectors on the host


@dataclass
class Encoded:
    """An encode call's result: the vectors and what it took to make them."""

    embeddings: np.ndarray  # (N, D) unit FP32 rows; NaN rows for texts that `keep` dropped
    token_counts: np.ndarray  # (N,) int32: the tokens each text was embedded with (special ones included)
    truncated: np.ndarray  # (N,) bool: the text had more than max_length tokens and was cut
    passes: int = 0  # forward passes run
    padded_tokens: int = 0  # tokens those passes computed, padding included
    records: list[PassRecord] = field(default_factory=list)  # each pass, where the encoder records them


class TextEncoder(Protocol):
    architecture: Architecture
    dimension: int
    max_length: int
    runs_on: str  # what its forward pass runs on (openvino_runtime, cpu_linear), for the load log

    def default_instruction(self, prompt_name: str) -> str: ...

    def check_instruction(self, instruction: str) -> None: ...

    def encode(self, texts: list[str], options: list[TextOptions], keep: KeepFilter | None = None) -> Encoded:
        """Row i for texts[i] embedded with options[i]. Before each forward pass, `keep` (if given)
        receives the indices of the pass's texts and returns those still wanted. A text over
        max_length with truncate NONE is not computed (its row stays NaN, `truncated` marks it and
        `token_counts` holds its whole length)."""
        ...
