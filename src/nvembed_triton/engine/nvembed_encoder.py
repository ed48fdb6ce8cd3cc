"""NV-Embed-v2 as a text encoder: tokenise, pack by token budget, run, restore the input order."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from nvembed_triton.engine.checkpoint import TOKENIZER_FILE, Architecture
from nvembed_triton.engine.cpu_linear import prepare_linears
from nvembed_triton.engine.cuda_graphs import capture_or_none
from nvembed_triton.engine.nvembed_model import load_nvembed
from nvembed_triton.engine.passes import PassRunner, workers_for
from nvembed_triton.engine.text_encoder import Encoded, KeepFilter
from nvembed_triton.engine.tokenization import PAD_ID, NVEmbedTokenizer, TokenizedText
from nvembed_triton.protocol.contract import DOCUMENT_PROMPT, QUERY_PROMPT, RETRIEVAL_TASK, nvembed_query_instruction
from nvembed_triton.protocol.options import TextOptions
from nvembed_triton.protocol.settings import EncoderSettings


class NVEmbedEncoder:
    architecture = Architecture.NV_EMBED_V2

    def __init__(self, settings: EncoderSettings):
        """`settings.model_dir` must have passed checkpoint.check_model_dir (load_encoder does that)."""
        self.device = torch.device(settings.device)
        self.max_length = settings.max_length
        self.max_batch_tokens = settings.max_batch_tokens
        self.passes = PassRunner(workers_for(settings.device))
        self.tokenizer = NVEmbedTokenizer(Path(settings.model_dir) / TOKENIZER_FILE, self.max_length)
        self.model = load_nvembed(settings.model_dir, self.device, getattr(torch, settings.dtype))
        self.runs_on = prepare_linears(self.model, settings)
        self.graphs = capture_or_none(self.model, self.device, settings.cuda_graphs)
        self.dimension = self.model.dimension

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
            result.embeddings[batch] = self.embed_tokenized([tokenized[i] for i in batch])

        result.passes, result.padded_tokens = self.passes.run(wanted, counts.tolist(), self.max_batch_tokens, compute, keep)
        return result

    def embed_tokenized(self, batch: list[TokenizedText]) -> np.ndarray:
        """One forward pass over `batch`, right-padded to its longest member."""
        input_ids, valid = pad_right([t.ids for t in batch])
        pool_from = torch.tensor([t.pool_from for t in batch])
        if self.graphs is not None and (vectors := self.graphs.embed(input_ids, valid, pool_from)) is not None:
            return vectors
        to = dict(device=self.device, non_blocking=True)
        return self.model.embed(input_ids.to(**to), valid.to(**to), pool_from.to(**to)).cpu().numpy()


def pad_right(sequences: Sequence[Sequence[int] | torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows padded on the right to the longest: (input_ids, valid) [rows, longest]."""
    longest = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), longest), PAD_ID, dtype=torch.long)
    valid = torch.zeros((len(sequences), longest), dtype=torch.bool)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.as_tensor(ids)
        valid[row, : len(ids)] = True
    return input_ids, valid
