"""Token ids must equal the Mistral v1 sentencepiece model's: a mis-converted tokenizer silently
changes every embedding."""

import random
import string

import pytest
import sentencepiece

from nvembed_triton.engine.tokenization import NVEmbedTokenizer
from nvembed_triton.protocol.contract import RETRIEVAL_TASK, nvembed_query_instruction
from nvembed_triton.protocol.errors import InvalidInputError

TEXTS = [
    "x",
    "How do neural networks learn patterns from examples?",
    "héllo 世界 🙂 naïve café, 1234.5 — ok",
    "tab\there\nnewline",
    "Instruct: Given a question, retrieve passages that answer the question\nQuery: what is RAG?",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return NVEmbedTokenizer(tiny_checkpoint / "tokenizer.json", max_length=64)


@pytest.fixture(scope="module")
def spm(tiny_checkpoint):
    return sentencepiece.SentencePieceProcessor(model_file=str(tiny_checkpoint / "tokenizer.model"))


def test_x_is_bos_then_the_x_piece(tokenizer):
    assert tokenizer.encode(["x"], [""])[0].ids == [1, 1318, 2]


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_sentencepiece_plus_eos(tokenizer, spm, text):
    assert tokenizer.encode([text], [""])[0].ids == ([1] + spm.encode(text) + [2])[:64]


def test_instruction_length_is_the_references_token_count(tokenizer, spm):
    instruction = nvembed_query_instruction(RETRIEVAL_TASK)
    assert tokenizer.instruction_length(instruction) == len(spm.encode(instruction))
    assert tokenizer.encode(["q"], [instruction])[0].pool_from == len(spm.encode(instruction))
    assert tokenizer.encode(["q"], [""])[0].pool_from == 0


def test_truncation_keeps_the_first_max_length_ids_and_loses_eos(tokenizer, spm):
    text = "word " * 200
    ids = tokenizer.encode([text], [""])[0].ids
    assert ids == ([1] + spm.encode(text))[:64]
    assert 2 not in ids


def test_instruction_filling_max_length_is_refused(tokenizer):
    with pytest.raises(InvalidInputError, match="max_length 64"):
        tokenizer.check_instruction("long " * 100)


def rss_anon_mb() -> float:
    status = open("/proc/self/status").read()
    return int(status.split("RssAnon:")[1].split()[0]) / 1024


def test_unique_texts_leave_no_memory_behind(tokenizer):
    """The tokenizer's per-thread cache of merged sequences is off: with it on, 20,000 unique short
    texts (its sequences are whole texts) held ~85 MB here, and a server kept growing."""
    rng = random.Random(0)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    texts = [" ".join(rng.choice(words) for _ in range(30))[:200] for _ in range(20_000)]
    tokenizer.encode(texts[:64], [""] * 64)  # the tokenizer's threads and buffers exist before counting
    before = rss_anon_mb()
    for start in range(64, len(texts), 64):
        chunk = texts[start : start + 64]
        tokenizer.encode(chunk, [""] * len(chunk))
    assert rss_anon_mb() - before < 15
