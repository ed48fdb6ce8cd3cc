"""A benchmark-only stand-in for the network: NV-Embed-v2's tokenisation, token-budget planning and
every request rule run as when serving, but each forward pass returns one constant unit vector of
NV-Embed-v2's width instead of computing. Served like the real model, it measures the ceiling the
serving stack itself sets (bench/bench_plumbing.py). `h200` also waits, in each pass, as long as a
pass of that size took full-size NV-Embed-v2 on an H200 (the pass releases the GIL meanwhile, as a
GPU pass does while it runs): what the stack then serves shows whether it keeps such a GPU busy.
Never the default, and refused under the name nv-embed-v2 (checkpoint.check_served_name): clients
trust that name to mean the real model."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from nvembed_triton.engine.checkpoint import TOKENIZER_FILE, Architecture
from nvembed_triton.engine.nvembed_encoder import NVEmbedEncoder
from nvembed_triton.engine.passes import PassRunner
from nvembed_triton.engine.text_encoder import PassRecord
from nvembed_triton.engine.tokenization import NVEmbedTokenizer, TokenizedText
from nvembed_triton.settings import STAND_IN_H200, EncoderSettings

DIMENSION = 4096  # NV-Embed-v2's, so responses are as large as the real ones
# An H200's pass of full-size NV-Embed-v2 in fp16 (bench/runs/2026-11-29/gpu-server.json): a lone
# 25-token query replayed from its CUDA graph took 9.02 ms (reading the weights bounds small passes),
# and passes of mixed documents ran at 22,479 tokens/s (computing bounds large ones).
H200_SMALL_PASS_MS = 9.02
H200_TOKENS_PER_S = 22_479


def h200_pass_ms(computed_tokens: int) -> float:
    return max(H200_SMALL_PASS_MS, computed_tokens / H200_TOKENS_PER_S * 1e3)


class ConstantEncoder(NVEmbedEncoder):
    architecture = Architecture.STAND_IN

    def __init__(self, settings: EncoderSettings):  # no weights are loaded
        self.max_length = settings.max_length
        self.max_batch_tokens = settings.max_batch_tokens
        self.passes = PassRunner(workers=1)  # nothing to compute in parallel
        self.packed, self.graphs = False, None
        self.tokenizer = NVEmbedTokenizer(Path(settings.model_dir) / TOKENIZER_FILE, self.max_length)
        self.dimension = DIMENSION
        self.timed = settings.stand_in == STAND_IN_H200
        self.runs_on = "none (stand-in" + (", each pass as long as an H200's)" if self.timed else ")")
        self._row = np.zeros(DIMENSION, dtype=np.float32)
        self._row[0] = 1.0

    def embed_tokenized(self, batch: list[TokenizedText]) -> tuple[np.ndarray, PassRecord]:
        lengths = [len(t.ids) for t in batch]
        computed = len(batch) * max(lengths)
        started = time.perf_counter()
        if self.timed:
            time.sleep(h200_pass_ms(computed) / 1e3)
        wall_ms = (time.perf_counter() - started) * 1e3
        return np.broadcast_to(self._row, (len(batch), DIMENSION)), PassRecord(len(batch), sum(lengths), computed, "stand-in",
                                                                                None, wall_ms)  # fmt: skip
