"""Over-long texts are cut to a byte bound before tokenisation; the ids that survive truncation must
be exactly those of the whole text, tokenised with the tokenizers library and truncated."""

import random
import time

import numpy as np
import pytest
from tokenizers import Tokenizer

from nvembed_triton.engine.st_encoder import SentenceTransformerEncoder
from nvembed_triton.engine.tokenization import CUT_MARGIN_TOKENS, EOS_TEXT, NVEmbedTokenizer, cut_at_bytes, max_token_bytes
from nvembed_triton.launcher.serve import demo_model_dir
from nvembed_triton.protocol.contract import RETRIEVAL_TASK, nvembed_query_instruction
from nvembed_triton.protocol.options import TextOptions
from nvembed_triton.settings import EncoderSettings

MAX_LENGTHS = (8, 64, 256)
QUERY = nvembed_query_instruction(RETRIEVAL_TASK)
# (max_length, instruction); NV-Embed refuses an instruction that fills max_length, so 8 gets a short one.
CASES = [(8, ""), (8, "query: "), (64, ""), (64, QUERY), (256, ""), (256, QUERY)]
CASE_IDS = [f"{m}-{'query' if i == QUERY else repr(i)}" for m, i in CASES]
SIZE = 60_000  # bytes: over twice the largest bound below (48 * (256 + 256))
SEP_ID = 102


def adversarial_texts(n: int) -> dict[str, str]:
    rng = random.Random(0)
    words = "héllo 世界 🙂 naïve café, 1234.5 — ok ÀÉÎ Straße ﬁ\u0301 K "
    code_points = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]  # every scalar value
    return {
        "spaces": " " * n,
        "spaces then words": " " * n + "then some words " * 300,
        "whitespace then words": "\n\t \r\u3000" * (n // 7) + "tail words " * 300,
        "one letter": "a" * n,
        "one letter then words": "a" * n + " then words" * 300,
        "literal U+2581": "▁" * (n // 3),
        "spaced U+2581": "▁ ▁▁ " * (n // 11),
        "words": "word " * (n // 5),
        "mixed multi-byte": words * (n // len(words.encode())),
        "CJK": "世界和平，语言模型。" * (n // 30),
        "emoji": "🙂👍🏽🇫🇷👩‍👩‍👧" * (n // 40),
        "vanishing then words": "\x00\u0301\u200b\x7f" * (n // 8) + "tail words " * 300,
        "special-token text": "</s><s><unk>[CLS][SEP][UNK]<0x41>" * (n // 34),
        "random code points": "".join(chr(rng.choice(code_points)) for _ in range(n // 4)),
        "random bytes": bytes(rng.randrange(256) for _ in range(n)).decode("utf-8", errors="replace"),
    }


TEXTS = adversarial_texts(SIZE)


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def around(bound: int) -> dict[str, str]:
    """Texts of bound - 1 ... bound + 1 bytes, and ones where a 4-byte character straddles the bound."""
    texts = {f"{bound + d} bytes": "ab c" * (bound // 4 - 1) + "x" * (bound % 4 + 4 + d) for d in (-1, 0, 1)}
    texts.update({f"emoji at {bound - k}": "a" * (bound - k) + "🙂" * 40 for k in (1, 2, 3, 4)})
    return texts


# --- NV-Embed (Mistral byte-fallback BPE) -------------------------------------------------------


class SpyTokenizer:
    """Records the UTF-8 size of every input the wrapped tokenizer is given."""

    def __init__(self, inner: Tokenizer):
        self.inner = inner
        self.input_bytes: list[int] = []

    def encode_batch(self, inputs):
        self.input_bytes += [utf8_len(s) for s in inputs]
        return self.inner.encode_batch(inputs)


@pytest.fixture(scope="module")
def nv_raw(tiny_checkpoint):
    tokenizer = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


@pytest.fixture(scope="module")
def nv_tokenizers(tiny_checkpoint):
    return {m: NVEmbedTokenizer(tiny_checkpoint / "tokenizer.json", max_length=m) for m in (*MAX_LENGTHS, 32768)}


@pytest.fixture(scope="module")
def nv_full_ids(nv_raw):
    """The reference: each whole text tokenised by the tokenizers library, not yet truncated."""
    cache = {}

    def full_ids(instruction: str) -> list[list[int]]:
        if instruction not in cache:
            cache[instruction] = [e.ids for e in nv_raw.encode_batch([instruction + t + EOS_TEXT for t in TEXTS.values()])]
        return cache[instruction]

    return full_ids


def test_nvembed_bound_comes_from_the_vocab(nv_raw, nv_tokenizers):
    # "▁" * 16 is the longest token: 16 literal U+2581 characters of 3 bytes each.
    assert max_token_bytes(nv_raw) == 48
    for m, tokenizer in nv_tokenizers.items():
        assert tokenizer.max_text_bytes == 48 * (m + CUT_MARGIN_TOKENS)
    assert nv_tokenizers[32768].max_text_bytes == 1_585_152


@pytest.mark.parametrize(("max_length", "instruction"), CASES, ids=CASE_IDS)
def test_nvembed_ids_after_the_cut_equal_full_tokenisation(tiny_checkpoint, nv_full_ids, max_length, instruction):
    tokenizer = NVEmbedTokenizer(tiny_checkpoint / "tokenizer.json", max_length=max_length)
    spy = tokenizer.cutter.tokenizer = SpyTokenizer(tokenizer.cutter.tokenizer)
    names, texts = list(TEXTS), list(TEXTS.values())
    assert all(utf8_len(t) > 2 * tokenizer.max_text_bytes for t in texts)
    got = tokenizer.encode(texts, [instruction] * len(texts))
    for name, tokenized, full in zip(names, got, nv_full_ids(instruction), strict=True):
        assert tokenized.ids == full[:max_length], name
    # Every text was cut, and the vocabulary bound alone held: no cut had to be widened.
    assert len(spy.input_bytes) == len(texts)
    assert all(n <= utf8_len(instruction) + tokenizer.max_text_bytes + len(EOS_TEXT) for n in spy.input_bytes)


@pytest.mark.parametrize("instruction", ["", QUERY], ids=["no-instruction", "query"])
def test_nvembed_texts_around_the_bound(nv_tokenizers, nv_raw, instruction):
    tokenizer = nv_tokenizers[64]
    texts = around(tokenizer.max_text_bytes)
    got = tokenizer.encode(list(texts.values()), [instruction] * len(texts))
    full = nv_raw.encode_batch([instruction + t + EOS_TEXT for t in texts.values()])
    for (name, text), tokenized, reference in zip(texts.items(), got, full, strict=True):
        assert tokenized.ids == reference.ids[:64], name
        cut = cut_at_bytes(text, tokenizer.max_text_bytes)
        assert (cut is text) == (utf8_len(text) <= tokenizer.max_text_bytes), name


def test_nvembed_huge_text_is_cut_before_tokenisation(tiny_checkpoint, nv_raw):
    tokenizer = NVEmbedTokenizer(tiny_checkpoint / "tokenizer.json", max_length=256)
    spy = tokenizer.cutter.tokenizer = SpyTokenizer(tokenizer.cutter.tokenizer)
    huge = "How do neural networks learn? " * 100_000  # 3 MB
    tokenized = tokenizer.encode([huge, "short"], [QUERY, QUERY])
    assert spy.input_bytes == [utf8_len(QUERY) + tokenizer.max_text_bytes + len(EOS_TEXT), utf8_len(QUERY + "short" + EOS_TEXT)]
    assert tokenized[0].ids == nv_raw.encode(QUERY + huge[:50_000]).ids[:256]


def test_nvembed_5mb_text_is_encoded_quickly(nv_tokenizers):
    text = "héllo 世界 naïve café, the quick brown fox. " * 110_000  # ~5 MB
    assert utf8_len(text) > 5_000_000
    start = time.perf_counter()
    tokenized = nv_tokenizers[256].encode([text], [QUERY])
    assert time.perf_counter() - start < 1.0  # a check that the cut happened, not a benchmark
    assert len(tokenized[0].ids) == 256


# --- sentence-transformers (all-MiniLM-L6-v2: BERT WordPiece) ------------------------------------


@pytest.fixture(scope="module")
def st_raw():
    tokenizer = Tokenizer.from_file(str(demo_model_dir() / "tokenizer.json"))
    tokenizer.no_truncation()  # the file ships truncation and padding at 128
    tokenizer.no_padding()
    return tokenizer


@pytest.fixture(scope="module")
def st_encoders():
    return {m: SentenceTransformerEncoder(EncoderSettings(str(demo_model_dir()), "cpu", "float32", m, 4096)) for m in MAX_LENGTHS}


@pytest.fixture(scope="module")
def st_full_ids(st_raw):
    cache = {}

    def full_ids(instruction: str) -> list[list[int]]:
        if instruction not in cache:
            cache[instruction] = [e.ids for e in st_raw.encode_batch([instruction + t for t in TEXTS.values()])]
        return cache[instruction]

    return full_ids


def truncated(ids: list[int], max_length: int) -> list[int]:
    """BERT truncation: the first max_length - 1 ids ([CLS] and text), then [SEP]."""
    return ids if len(ids) <= max_length else ids[: max_length - 1] + [SEP_ID]


def st_ids(encoder: SentenceTransformerEncoder, texts: list[str], instruction: str) -> list[list[int]]:
    """The ids sentence-transformers itself gives the texts after the encoder's cut."""
    features = encoder.model.preprocess(encoder.cutter.cut(texts, [instruction] * len(texts)), prompt=instruction or None)
    return [ids[mask.bool()].tolist() for ids, mask in zip(features["input_ids"], features["attention_mask"], strict=True)]


def test_st_bound_comes_from_the_vocab(st_raw, st_encoders):
    assert max_token_bytes(st_raw) == 18  # "telecommunications"; "##" prefixes add no bytes
    for m, encoder in st_encoders.items():
        assert encoder.max_length == m
        assert encoder.cutter.max_text_bytes == 18 * (m + CUT_MARGIN_TOKENS)


@pytest.mark.parametrize(("max_length", "instruction"), CASES, ids=CASE_IDS)
def test_st_ids_after_the_cut_equal_full_tokenisation(st_encoders, st_full_ids, max_length, instruction):
    encoder = st_encoders[max_length]
    names, texts = list(TEXTS), list(TEXTS.values())
    assert all(utf8_len(t) > 2 * encoder.cutter.max_text_bytes for t in texts)
    for name, ids, full in zip(names, st_ids(encoder, texts, instruction), st_full_ids(instruction), strict=True):
        assert ids == truncated(full, max_length), name


def test_st_cut_widens_where_text_vanishes(st_encoders, st_raw):
    """BERT drops whitespace, so the vocabulary bound alone is not enough: the checked cut grows."""
    encoder = st_encoders[64]
    text = " " * 20_000 + "some words " * 10_000
    (cut,) = encoder.cutter.cut([text], [""])
    assert encoder.cutter.max_text_bytes < utf8_len(cut) < utf8_len(text)
    assert text.startswith(cut)
    assert st_ids(encoder, [text], "") == [truncated(st_raw.encode(text).ids, 64)]


@pytest.mark.parametrize("instruction", ["", QUERY], ids=["no-instruction", "query"])
def test_st_texts_around_the_bound(st_encoders, st_raw, instruction):
    encoder = st_encoders[64]
    bound = encoder.cutter.max_text_bytes
    texts = around(bound)
    full = st_raw.encode_batch([instruction + t for t in texts.values()])
    for (name, text), ids, reference in zip(texts.items(), st_ids(encoder, list(texts.values()), instruction), full, strict=True):
        assert ids == truncated(reference.ids, 64), name
        assert (cut_at_bytes(text, bound) is text) == (utf8_len(text) <= bound), name


def test_st_huge_text_is_cut_and_encoded_quickly(st_encoders, monkeypatch):
    encoder = st_encoders[256]
    text = "héllo 世界 naïve café, the quick brown fox. " * 110_000  # ~5 MB
    expected = encoder.encode([text[:5_000]], [TextOptions(QUERY)]).embeddings  # already past 256 tokens
    start = time.perf_counter()
    embedding = encoder.encode([text], [TextOptions(QUERY)]).embeddings
    assert time.perf_counter() - start < 1.0  # a check that the cut happened, not a benchmark
    np.testing.assert_allclose(embedding, expected, rtol=1e-5, atol=1e-6)
    seen = []
    real_encode = encoder.model.encode
    monkeypatch.setattr(encoder.model, "encode", lambda texts, **kw: seen.extend(texts) or real_encode(texts, **kw))
    encoder.encode([text, "short"], TextOptions.each(2, instruction=QUERY))
    assert len(seen) == 2 and seen[1] == "short"
    assert encoder.cutter.max_text_bytes - 4 < utf8_len(seen[0]) <= encoder.cutter.max_text_bytes


# --- the cut itself ------------------------------------------------------------------------------


@pytest.mark.parametrize("max_bytes", [0, 1, 2, 3, 4, 5, 6, 7, 100, 101, 102, 103])
def test_cut_never_splits_a_character(max_bytes):
    text = "a🙂é世" * 30
    cut = cut_at_bytes(text, max_bytes)
    assert text.startswith(cut)
    assert max_bytes - 4 < utf8_len(cut) <= max_bytes


def test_cut_leaves_texts_within_the_bound_untouched():
    for text in ("", "a", "🙂" * 25, "a" * 100):
        assert cut_at_bytes(text, 100) is text
    assert cut_at_bytes("a" * 101, 100) == "a" * 100
