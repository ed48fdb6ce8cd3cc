"""A benchmark-only stand-in for the network: NV-Embed-v2's tokenisation, token-budget planning and
every request rule run as when serving, but each forward pass returns one constant unit vector of
NV-Embed-v2's width instead of computing. Served like the real model, it measures the ceiling the
serving stack itself sets (bench/bench_plumbing.py). Never the default, and refused under the name
nv-embed-v2 (checkpoint.check_served_name): clients trust that name to mean the real model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nvembed_triton.engine.checkpoint import TOKENIZER_FILE, Architecture
from nvembed_triton.engine.nvembed_encoder import NVEmbedEncoder
from nvembed_triton.engine.passes import PassRunner
from nvembed_triton.engine.tokenization import NVEmbedTokenizer, TokenizedText
from nvembed_triton.protocol.settings import EncoderSettings

DIMENSION = 4096  # NV-Embed-v2's, so responses are as large as the real ones


class ConstantEncoder(NVEmbedEncoder):
    architecture = Architecture.STAND_IN

    def __init__(self, settings: EncoderSettings):  # no weights are loaded
        self.max_length = settings.max_length
        self.max_batch_tokens = settings.max_batch_tokens
        self.passes = PassRunner(workers=1)  # nothing to compute in parallel
        self.tokenizer = NVEmbedTokenizer(Path(settings.model_dir) / TOKENIZER_FILE, self.max_length)
        self.dimension = DIMENSION
        self.runs_on = "none (stand-in)"
        self._row = np.zeros(DIMENSION, dtype=np.float32)
        self._row[0] = 1.0

    def embed_tokenized(self, batch: list[TokenizedText]) -> np.ndarray:
        return np.broadcast_to(self._row, (len(batch), DIMENSION))
