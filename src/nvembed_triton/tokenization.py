"""NV-Embed-v2's text -> token ids step, exactly as the reference does it: instruction + text + "</s>",
BOS added, truncated to max_length (the EOS is lost when a text is cut), and the number of leading
positions that the mean pooling skips."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer

from .validation import InvalidInputError

EOS_TEXT = "</s>"
PAD_ID = 2  # the reference pads with EOS; padded positions are masked out everywhere


@dataclass(frozen=True)
class TokenizedText:
    ids: list[int]
    pool_from: int  # positions before this one (BOS + instruction) are left out of the mean


class NVEmbedTokenizer:
    def __init__(self, tokenizer_json: str | Path, max_length: int):
        # tokenizer.json is used as shipped: no re-conversion that could change token ids.
        self._tokenizer = Tokenizer.from_file(str(tokenizer_json))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.max_length = max_length

    @lru_cache(maxsize=64)
    def instruction_length(self, instruction: str) -> int:
        """The reference's `len(tokenizer.tokenize(instruction))`; it covers BOS and all but the
        last instruction token once BOS is prepended -- reproduced as published."""
        if not instruction:
            return 0
        return len(self._tokenizer.encode(instruction, add_special_tokens=False).ids)

    def check_instruction(self, instruction: str) -> None:
        """Every non-empty text keeps at least one pooled token unless the instruction alone fills
        max_length; then the reference would average nothing (NaN), so refuse the request."""
        length = self.instruction_length(instruction)
        if length >= self.max_length:
            raise InvalidInputError(
                f"the instruction is {length} tokens, which leaves no text token within max_length "
                f"{self.max_length}; shorten the instruction or raise max_length"
            )

    def encode(self, texts: list[str], instructions: list[str]) -> list[TokenizedText]:
        encodings = self._tokenizer.encode_batch(
            [instruction + text + EOS_TEXT for text, instruction in zip(texts, instructions, strict=True)]
        )
        tokenized = []
        for position, (encoding, instruction) in enumerate(zip(encodings, instructions, strict=True)):
            ids = encoding.ids[: self.max_length]
            pool_from = self.instruction_length(instruction)
            if len(ids) <= pool_from:
                raise InvalidInputError(
                    f"text {position}: max_length {self.max_length} leaves no token after the "
                    f"{pool_from}-token instruction; raise max_length or shorten the instruction"
                )
            tokenized.append(TokenizedText(ids, pool_from))
        return tokenized
