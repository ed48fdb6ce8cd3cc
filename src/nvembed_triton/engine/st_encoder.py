"""A sentence-transformers model as a text encoder. The library itself does tokenisation, pooling
and normalisation, so every model it supports is served as its authors meant."""

from __future__ import annotations

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from tokenizers import Tokenizer

from nvembed_triton.engine.checkpoint import Architecture
from nvembed_triton.engine.cpu_linear import prepare_linears
from nvembed_triton.engine.passes import PassRunner, workers_for
from nvembed_triton.engine.text_encoder import Encoded, KeepFilter
from nvembed_triton.engine.tokenization import TextCutter
from nvembed_triton.protocol.contract import DOCUMENT_PROMPT, QUERY_PROMPT, TRUNCATE_NONE, TRUNCATE_START
from nvembed_triton.protocol.errors import InvalidInputError
from nvembed_triton.protocol.options import TextOptions
from nvembed_triton.settings import CPU_ENGINE_OPENVINO, EncoderSettings

# Names under which sentence-transformers configs store their prompts (config_sentence_transformers.json).
_PROMPT_ALIASES = {QUERY_PROMPT: ("query",), DOCUMENT_PROMPT: ("document", "passage", "corpus")}


class SentenceTransformerEncoder:
    architecture = Architecture.SENTENCE_TRANSFORMERS

    def __init__(self, settings: EncoderSettings):
        # OpenVINO converts the fp32 network and computes in the settings' dtype itself.
        self.openvino = settings.device == "cpu" and settings.cpu_engine == CPU_ENGINE_OPENVINO
        options = {
            "device": settings.device,
            "local_files_only": True,
            "model_kwargs": {"dtype": torch.float32 if self.openvino else getattr(torch, settings.dtype)},
        }
        self.model = SentenceTransformer(settings.model_dir, **options)
        self.model.eval()
        self.runs_on, workers = self._prepare_forward(settings)
        # The model's own limit wins: beyond its position embeddings it cannot go.
        self.max_length = min(settings.max_length, self.model.max_seq_length or settings.max_length)
        self.model.max_seq_length = self.max_length
        self.dimension = self.model.get_embedding_dimension()
        self.max_batch_tokens = settings.max_batch_tokens
        self.passes = PassRunner(workers)
        # Texts are cut before the library tokenises them all (it truncates only afterwards); the
        # check of a cut uses a copy of the model's fast tokenizer that never truncates or pads.
        backend = getattr(self.model.tokenizer, "backend_tokenizer", None)
        self.cutter = None
        if backend is not None:
            tokenizer = Tokenizer.from_str(backend.to_str())
            tokenizer.no_truncation()
            tokenizer.no_padding()
            self.cutter = TextCutter(tokenizer, self.max_length)
        # One call before passes run side by side: the library sets its tokenizer's truncation and
        # padding on the first call (a change while another thread tokenises fails), later ones match.
        self.model.encode(["warm-up"], normalize_embeddings=True)

    def _prepare_forward(self, settings: EncoderSettings) -> tuple[str, int]:
        """What runs the forward pass (for the load log) and how many passes run at once. OpenVINO
        gives each pass every core itself (openvino_runtime.py); torch runs passes side by side
        (passes.py)."""
        workers = workers_for(settings.device)
        if not self.openvino:
            return prepare_linears(self.model, settings), workers
        from nvembed_triton.engine.openvino_runtime import NotConvertible, use_openvino  # imported only when used

        try:
            return use_openvino(self.model, torch.get_num_threads(), settings.dtype), 1
        except NotConvertible as why:
            self.openvino = False
            self.model.to(getattr(torch, settings.dtype))
            return f"{prepare_linears(self.model, settings)}; not OpenVINO: {why}", workers

    def default_instruction(self, prompt_name: str) -> str:
        # sentence-transformers fills in empty "query"/"document" prompts, so the first non-empty
        # one wins: e5-style configs store their document prompt as "passage".
        for alias in _PROMPT_ALIASES[prompt_name]:
            if self.model.prompts.get(alias):
                return self.model.prompts[alias]
        return ""

    def check_instruction(self, instruction: str) -> None:
        """sentence-transformers truncates prompt and text together; any instruction is accepted."""

    def encode(self, texts: list[str], options: list[TextOptions], keep: KeepFilter | None = None) -> Encoded:
        """See TextEncoder. Passes share an instruction, are planned by token budget over the texts'
        lengths (batching.plan_batches: sorted, padded only to their own longest) and run by
        passes.PassRunner (side by side on a CPU with torch; one at a time, each on every core,
        through OpenVINO), so `keep` can drop abandoned texts between
        passes. Sorting matters on a CPU: less padding, so passages embed much faster sorted than in
        arrival order (bench/RESULTS.md). sentence-transformers truncates the end; for START
        the text is cut here to the tokens that fit, so that the library keeps them all."""
        instructions, truncations = [o.instruction for o in options], [o.truncate for o in options]
        from_end = [mode == TRUNCATE_START for mode in truncations]
        if self.cutter is not None:
            texts = self.cutter.cut(texts, instructions, from_end)
        full_counts = self._token_counts(texts, instructions)
        over = full_counts > self.max_length
        texts = [
            self._keep_end(text, prompt) if long and end else text
            for text, prompt, long, end in zip(texts, instructions, over, from_end, strict=True)
        ]
        refused = over & np.array([mode == TRUNCATE_NONE for mode in truncations])
        counts = np.where(refused, full_counts, np.minimum(full_counts, self.max_length)).astype(np.int32)
        result = Encoded(np.full((len(texts), self.dimension), np.nan, dtype=np.float32), counts, over)
        for instruction in set(instructions):
            rows = [i for i, each in enumerate(instructions) if each == instruction and not refused[i]]

            def compute(batch: list[int], instruction: str = instruction) -> None:
                result.embeddings[batch] = self.model.encode(
                    [texts[i] for i in batch],
                    prompt=instruction,
                    batch_size=len(batch),
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                ).astype(np.float32)

            passes, padded = self.passes.run(rows, counts.tolist(), self.max_batch_tokens, compute, keep)
            result.passes += passes
            result.padded_tokens += padded
        return result

    def _keep_end(self, text: str, prompt: str) -> str:
        """The end of `text` that fits in max_length tokens after the prompt and special tokens."""
        tokenizer = self.cutter.tokenizer if self.cutter is not None else None
        if tokenizer is None:
            raise InvalidInputError("truncate START needs a model with a fast tokenizer")
        room = self.max_length - len(tokenizer.encode(prompt).ids)  # the prompt with the special tokens
        offsets = tokenizer.encode(text, add_special_tokens=False).offsets
        return text[offsets[-room][0] :] if 0 < room < len(offsets) else text

    def _token_counts(self, texts: list[str], instructions: list[str]) -> np.ndarray:
        """Each prompt + text's length in tokens, special tokens included, before truncation."""
        if self.cutter is not None:
            encodings = self.cutter.tokenizer.encode_batch([p + t for p, t in zip(instructions, texts, strict=True)])
            return np.array([len(e.ids) for e in encodings])
        return np.array([len(self.model.tokenizer(p + t)["input_ids"]) for p, t in zip(instructions, texts, strict=True)])
