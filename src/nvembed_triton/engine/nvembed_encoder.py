"""NV-Embed-v2 as a text encoder: tokenise, plan passes by token budget, run each (a CUDA graph for a
small GPU pass, else a packed or padded pass), restore the input order."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from nvembed_triton.engine.batching import plan_batches
from nvembed_triton.engine.checkpoint import TOKENIZER_FILE, Architecture
from nvembed_triton.engine.compiled import compile_backbone
from nvembed_triton.engine.cpu_linear import prepare_linears
from nvembed_triton.engine.cuda_graphs import bucket_of, capture_or_none
from nvembed_triton.engine.fp8 import quantise_backbone
from nvembed_triton.engine.nvembed_model import load_nvembed
from nvembed_triton.engine.packing import pack, plan_packed
from nvembed_triton.engine.passes import PassRunner, workers_for
from nvembed_triton.engine.text_encoder import Encoded, KeepFilter, PassRecord
from nvembed_triton.engine.tokenization import PAD_ID, NVEmbedTokenizer, TokenizedText
from nvembed_triton.protocol.contract import DOCUMENT_PROMPT, QUERY_PROMPT, RETRIEVAL_TASK, nvembed_query_instruction
from nvembed_triton.protocol.options import TextOptions
from nvembed_triton.settings import PASSES_AUTO, PASSES_PACKED, EncoderSettings

log = logging.getLogger(__name__)
# The load-time check of packed passes on a GPU: these texts packed and padded must agree this closely.
CHECK_TEXTS = ("a short text", "a somewhat longer text to embed, with more words in it", "x")
CHECK_MIN_COSINE = 0.999


class NVEmbedEncoder:
    architecture = Architecture.NV_EMBED_V2

    def __init__(self, settings: EncoderSettings):
        """`settings.model_dir` must have passed checkpoint.check_model_dir (load_encoder does that)."""
        self.device = torch.device(settings.device)
        self.max_length = settings.max_length
        self.max_batch_tokens = settings.max_batch_tokens
        # Compiled code is specialised to the calling thread's torch thread count: CPU passes side by side
        # (one thread each) would compile everything again, so a compiled model runs one pass at a time.
        self.passes = PassRunner(1 if settings.compile else workers_for(settings.device))
        self.tokenizer = NVEmbedTokenizer(Path(settings.model_dir) / TOKENIZER_FILE, self.max_length)
        self.model = load_nvembed(settings.model_dir, self.device, getattr(torch, settings.dtype))
        if settings.fp8:
            linears = f"FP8 linear layers ({quantise_backbone(self.model.backbone)} quantised; the head in {settings.dtype})"
        # Compiled layers read plain weights: the CPU's packed oneDNN layers are for eager ones.
        layers = compile_backbone(self.model.backbone) if settings.compile else "eager layers"
        if not settings.fp8:
            linears = prepare_linears(self.model, settings) if not layers.startswith("compiled") else "torch"
        self.graphs = capture_or_none(self.model, self.device, settings.cuda_graphs)
        self.packed, how = self._choose_passes(settings.passes)
        self.runs_on = f"{linears}; {layers}; {how}"
        self.dimension = self.model.dimension

    def _choose_passes(self, requested: str) -> tuple[bool, str]:
        """Packed or padded passes, and a line saying which and why."""
        if requested != PASSES_AUTO:
            return requested == PASSES_PACKED, f"{requested} passes"
        if self.device.type != "cuda":
            return False, "padded passes (auto: no varlen attention on a CPU)"
        try:
            tokenized = self.tokenizer.encode(list(CHECK_TEXTS), [""] * len(CHECK_TEXTS))
            packed, padded = self._embed_packed(tokenized)[0], self._embed_padded(tokenized)[0]
            worst = float((packed * padded).sum(axis=1).min())
        except Exception as error:  # a kernel this GPU or build lacks: the padded path still serves
            log.warning("packed passes not used: %s: %s", type(error).__name__, error)
            return False, f"padded passes (auto: packed failed its check: {type(error).__name__})"
        if not worst >= CHECK_MIN_COSINE:
            log.warning("packed passes not used: their vectors differ from padded ones (cosine %.6f)", worst)
            return False, f"padded passes (auto: packed differed, cosine {worst:.6f})"
        return True, "packed passes (auto: checked against padded at load)"

    def default_instruction(self, prompt_name: str) -> str:
        return {QUERY_PROMPT: nvembed_query_instruction(RETRIEVAL_TASK), DOCUMENT_PROMPT: ""}[prompt_name]

    def check_instruction(self, instruction: str) -> None:
        self.tokenizer.check_instruction(instruction)

    def encode(self, texts: list[str], options: list[TextOptions], keep: KeepFilter | None = None) -> Encoded:
        """See TextEncoder."""
        tokenized = self.tokenizer.encode(texts, [o.instruction for o in options], [o.truncate for o in options])
        counts = np.array([len(t.ids) for t in tokenized], dtype=np.int32)
        result = Encoded(
            np.full((len(texts), self.dimension), np.nan, dtype=np.float32), counts, np.array([t.truncated for t in tokenized])
        )
        wanted = [i for i, t in enumerate(tokenized) if len(t.ids) <= self.max_length]  # NONE leaves long ones whole

        def compute(batch: list[int]) -> None:
            result.embeddings[batch], record = self.embed_tokenized([tokenized[i] for i in batch])
            result.records.append(record)  # list.append is atomic: passes may run side by side

        planner = plan_packed if self.packed else plan_batches
        result.passes, _ = self.passes.run(wanted, counts.tolist(), self.max_batch_tokens, compute, keep, planner)
        result.padded_tokens = sum(record.computed for record in result.records)
        return result

    def embed_tokenized(self, batch: list[TokenizedText]) -> tuple[np.ndarray, PassRecord]:
        """One forward pass over `batch`: (its unit vectors, what the pass was)."""
        if self.graphs is not None:
            lengths = [len(t.ids) for t in batch]
            if (bucket := bucket_of(len(batch), max(lengths))) is not None:
                started = time.perf_counter()
                input_ids, valid = pad_right([t.ids for t in batch])
                vectors, device_ms = self.graphs.embed(input_ids, valid, torch.tensor([t.pool_from for t in batch]))
                return vectors, PassRecord(len(batch), sum(lengths), bucket[0] * bucket[1], f"graph {bucket[0]}x{bucket[1]}",
                                           device_ms, (time.perf_counter() - started) * 1e3)  # fmt: skip
        return self._embed_packed(batch) if self.packed else self._embed_padded(batch)

    def _embed_padded(self, batch: list[TokenizedText]) -> tuple[np.ndarray, PassRecord]:
        """Rows right-padded to the longest member."""
        started, timer = time.perf_counter(), DeviceTimer(self.device)
        input_ids, valid = pad_right([t.ids for t in batch])
        pool_from = torch.tensor([t.pool_from for t in batch])
        to = dict(device=self.device, non_blocking=True)
        with timer:
            vectors = self.model.embed(input_ids.to(**to), valid.to(**to), pool_from.to(**to))
        vectors = vectors.cpu().numpy()
        return vectors, PassRecord(len(batch), int(valid.sum()), valid.numel(), "padded", timer.ms(),
                                   (time.perf_counter() - started) * 1e3)  # fmt: skip

    def _embed_packed(self, batch: list[TokenizedText]) -> tuple[np.ndarray, PassRecord]:
        """The texts end to end, no padding."""
        started, timer = time.perf_counter(), DeviceTimer(self.device)
        packed = pack([t.ids for t in batch], [t.pool_from for t in batch]).to(self.device)
        with timer:
            vectors = self.model.embed_packed(packed)
        vectors = vectors.cpu().numpy()
        tokens = int(packed.input_ids.shape[0])
        return vectors, PassRecord(len(batch), tokens, tokens, "packed", timer.ms(), (time.perf_counter() - started) * 1e3)


class DeviceTimer:
    """The device time of the work launched inside `with` (CUDA events on a GPU; None on a CPU, where
    the pass's wall time says it). ms() is read after the results have come back (a sync)."""

    def __init__(self, device: torch.device):
        cuda = device.type == "cuda"
        self.events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if cuda else None

    def __enter__(self):
        if self.events:
            self.events[0].record()

    def __exit__(self, *exc_info):
        if self.events:
            self.events[1].record()

    def ms(self) -> float | None:
        return self.events[0].elapsed_time(self.events[1]) if self.events else None


def pad_right(sequences: Sequence[Sequence[int] | torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows padded on the right to the longest: (input_ids, valid) [rows, longest]."""
    longest = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), longest), PAD_ID, dtype=torch.long)
    valid = torch.zeros((len(sequences), longest), dtype=torch.bool)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.as_tensor(ids)
        valid[row, : len(ids)] = True
    return input_ids, valid
