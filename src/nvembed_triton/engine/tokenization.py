"""NV-Embed-v2's text -> token ids step, exactly as the reference does it: instruction + text + "</s>",
BOS added, truncated to max_length (the EOS is lost when a text is cut), and the number of leading
positions that the mean pooling skips. Over-long texts are cut to a byte bound first (TextCutter), so
a 10 MB text costs no more to tokenise than one at the bound, with the same surviving ids."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tokenizers import Encoding, Tokenizer

from nvembed_triton.protocol.contract import TRUNCATE_END, TRUNCATE_START
from nvembed_triton.protocol.errors import InvalidInputError

EOS_TEXT = "</s>"
PAD_ID = 2  # the reference pads with EOS; padded positions are masked out everywhere

# Tokens' worth of bytes kept beyond the max_tokens that survive truncation. Cutting a text changes
# its tokenisation only near the cut: BPE merges at the cut re-pair a few tokens before it (at most 4
# seen over adversarial texts, for Mistral's BPE and BERT's WordPiece alike), and a WordPiece word cut
# in two changes that word's tokens (at most max_input_chars_per_word, 100). So when the cut input
# still gives max_tokens + CUT_MARGIN_TOKENS tokens, its first max_tokens are those of the whole text.
# 256 is well beyond both, and adds under 1% to the bound at max_length 32768.
CUT_MARGIN_TOKENS = 256
_BYTE_FALLBACK_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def max_token_bytes(tokenizer: Tokenizer) -> int:
    """The most UTF-8 bytes of text that one vocabulary token (added tokens included) stands for.
    A byte-fallback token "<0xNN>" stands for one byte and a WordPiece "##" / BPE affix for none.
    SentencePiece's "▁" is what a space (1 byte) becomes, but a text may also hold a literal
    U+2581 (3 bytes), which the normaliser keeps: so "▁" counts its own 3 bytes."""
    model = json.loads(tokenizer.to_str())["model"]
    prefix = model.get("continuing_subword_prefix") or ""
    suffix = model.get("end_of_word_suffix") or ""

    def size(token: str) -> int:
        if model.get("byte_fallback") and _BYTE_FALLBACK_TOKEN.fullmatch(token):
            return 1
        if prefix and token.startswith(prefix) and token != prefix:
            token = token[len(prefix) :]
        if suffix and token.endswith(suffix) and token != suffix:
            token = token[: -len(suffix)]
        return len(token.encode("utf-8"))

    return max(size(token) for token in tokenizer.get_vocab(with_added_tokens=True))


def cut_at_bytes(text: str, max_bytes: int) -> str:
    """text itself when it is at most max_bytes UTF-8 bytes long; otherwise its longest prefix of at
    most max_bytes bytes that ends on a character boundary. Costs O(max_bytes), not O(len(text))."""
    if len(text) * 4 <= max_bytes:  # no character is longer than 4 bytes
        return text
    head = text[: max_bytes + 1].encode("utf-8")  # > max_bytes bytes iff text is
    if len(head) <= max_bytes:
        return text
    return head[:max_bytes].decode("utf-8", errors="ignore")  # drops only a split last character


def cut_end_at_bytes(text: str, max_bytes: int) -> str:
    """cut_at_bytes from the other end: text itself, or its longest suffix of at most max_bytes bytes."""
    if len(text) * 4 <= max_bytes:
        return text
    tail = text[-(max_bytes + 1) :].encode("utf-8")
    if len(tail) <= max_bytes:
        return text
    return tail[-max_bytes:].decode("utf-8", errors="ignore")  # drops only a split first character


class TextCutter:
    """Cuts texts over max_text_bytes before tokenisation such that the first max_tokens ids of
    prefix + text + suffix stay those of the whole text. max_text_bytes = max_token_bytes *
    (max_tokens + CUT_MARGIN_TOKENS): a cut text keeps at least that many tokens whenever no
    character vanishes in tokenisation (Mistral/Llama's byte-fallback BPE). Where text can vanish
    (BERT drops whitespace, control characters and accents; its [UNK] swallows a whole word) the
    count is checked, and a cut that falls short is doubled until it holds or the text is whole."""

    def __init__(self, tokenizer: Tokenizer, max_tokens: int):
        self.tokenizer = tokenizer  # must not truncate or pad
        self.min_tokens = max_tokens + CUT_MARGIN_TOKENS
        self.max_text_bytes = max_token_bytes(tokenizer) * self.min_tokens

    def encode(
        self, texts: list[str], prefixes: list[str], suffix: str = "", from_end: list[bool] | None = None
    ) -> tuple[list[str], list[Encoding]]:
        """The texts as cut, and the encodings of prefix + cut text + suffix. A text with from_end
        keeps its end instead (the last max_tokens ids stay those of the whole text)."""
        from_end = from_end or [False] * len(texts)

        def cut_text(i: int, max_bytes: int) -> str:
            return (cut_end_at_bytes if from_end[i] else cut_at_bytes)(texts[i], max_bytes)

        cut = [cut_text(i, self.max_text_bytes) for i in range(len(texts))]
        encodings = self.tokenizer.encode_batch([p + c + suffix for p, c in zip(prefixes, cut, strict=True)])
        max_bytes = self.max_text_bytes
        while short := [i for i, c in enumerate(cut) if len(c) < len(texts[i]) and len(encodings[i].ids) < self.min_tokens]:
            max_bytes *= 2
            for i in short:
                cut[i] = cut_text(i, max_bytes)
            for i, encoding in zip(
                short, self.tokenizer.encode_batch([prefixes[i] + cut[i] + suffix for i in short]), strict=True
            ):
                encodings[i] = encoding
        return cut, encodings

    def cut(self, texts: list[str], prefixes: list[str], from_end: list[bool] | None = None) -> list[str]:
        """The texts, those over max_text_bytes cut; only those are tokenised (to check their cut)."""
        from_end = from_end or [False] * len(texts)
        long = [i for i, text in enumerate(texts) if cut_at_bytes(text, self.max_text_bytes) is not text]
        cut, _ = self.encode([texts[i] for i in long], [prefixes[i] for i in long], from_end=[from_end[i] for i in long])
        texts = list(texts)
        for i, text in zip(long, cut, strict=True):
            texts[i] = text
        return texts


@dataclass(frozen=True)
class TokenizedText:
    ids: list[int]  # truncated to max_length, except with truncate NONE
    pool_from: int  # positions before this one (BOS + instruction) are left out of the mean
    truncated: bool  # the whole text had more than max_length tokens


class NVEmbedTokenizer:
    def __init__(self, tokenizer_json: str | Path, max_length: int):
        # tokenizer.json is used as shipped: no re-conversion that could change token ids.
        self._tokenizer = Tokenizer.from_file(str(tokenizer_json))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        # The BPE model caches the merges of every sequence under 256 bytes, up to 10,000 in each
        # thread that tokenises (tokenizers 0.23). This tokenizer does not split text into words:
        # its sequences are whole texts, so the caches fill with unique short texts (~8 KB each,
        # hits rare) and the server grew for its first half hour (bench/RESULTS.md). Off.
        self._tokenizer.model._resize_cache(0)
        self.max_length = max_length
        self.cutter = TextCutter(self._tokenizer, max_length)
        self.max_text_bytes = self.cutter.max_text_bytes  # longer texts are cut before tokenisation

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

    def encode(self, texts: list[str], instructions: list[str], truncations: list[str] | None = None) -> list[TokenizedText]:
        """truncations: per text, END (keep the start: the reference's), START (keep BOS, the
        instruction and the end of the text) or NONE (ids left whole; the caller refuses them)."""
        truncations = truncations or [TRUNCATE_END] * len(texts)
        from_end = [mode == TRUNCATE_START for mode in truncations]
        _, encodings = self.cutter.encode(texts, instructions, EOS_TEXT, from_end)
        tokenized = []
        for position, (encoding, instruction, mode) in enumerate(zip(encodings, instructions, truncations, strict=True)):
            pool_from = self.instruction_length(instruction)
            ids = encoding.ids
            if len(ids) > self.max_length and mode == TRUNCATE_END:
                ids = ids[: self.max_length]
            elif len(ids) > self.max_length and mode == TRUNCATE_START:
                head = 1 + pool_from  # BOS and the instruction's tokens
                ids = ids[:head] + ids[head:][len(ids) - self.max_length :]
            if len(ids) <= pool_from:
                raise InvalidInputError(
                    f"text {position}: max_length {self.max_length} leaves no token after the "
                    f"{pool_from}-token instruction; raise max_length or shorten the instruction"
                )
            tokenized.append(TokenizedText(ids, pool_from, truncated=len(encoding.ids) > self.max_length))
        return tokenized
