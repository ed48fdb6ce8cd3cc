"""The request rules of both models (request_rules.py), without Triton: which texts, which
instruction and options a request becomes, and how an encoder call's rows go back to their requests."""

import json

import numpy as np
import pytest

from nvembed_triton.protocol import contract
from nvembed_triton.protocol.errors import InvalidInputError
from nvembed_triton.protocol.lifecycle import CANCEL_TOKEN_PARAMETER
from nvembed_triton.protocol.options import TextOptions
from nvembed_triton.protocol.request_rules import (
    CUSTOM_PROMPT,
    Answer,
    Refusal,
    combine,
    encoder_model_for,
    encoder_request,
    public_request,
    split,
)
from nvembed_triton.protocol.validation import RequestLimits

LIMITS = RequestLimits(max_documents=4, max_request_bytes=100)
NO_CONFIG = {contract.QUERY_PROMPT: "", contract.DOCUMENT_PROMPT: ""}
DEFAULTS = {contract.QUERY_PROMPT: "Q: ", contract.DOCUMENT_PROMPT: ""}  # a model's own instructions


def texts(*values, shape=None):
    array = np.array([v.encode() for v in values], dtype=object)
    return array.reshape(shape) if shape else array


def params(**values):
    return json.dumps(values)


# ---- the public model ----


def test_a_query_becomes_one_text_with_the_models_own_query_instruction():
    forward = public_request(texts("what is x?"), None, None, LIMITS, NO_CONFIG)
    assert forward.texts.shape == (1, 1) and forward.texts[0, 0] == b"what is x?"
    assert forward.prompt_name == contract.QUERY_PROMPT
    assert forward.instruction is None  # the encoder applies the model's own
    assert forward.parameters == {}


def test_documents_keep_their_order():
    forward = public_request(None, texts("a", "b", "c", shape=(1, 3)), None, LIMITS, NO_CONFIG)
    assert forward.texts.tolist() == [[b"a", b"b", b"c"]] and forward.prompt_name == contract.DOCUMENT_PROMPT


@pytest.mark.parametrize(
    "request_instruction,configured,expected",
    [
        (None, "", None),  # nothing set: the model's own
        (None, "cfg: ", "cfg: "),  # the configured query_instruction
        ("mine: ", "cfg: ", "mine: "),  # the request's own wins
        ("", "cfg: ", ""),  # even an empty one: "no instruction" on purpose
    ],
)
def test_instruction_precedence(request_instruction, configured, expected):
    options = params(instruction=request_instruction) if request_instruction is not None else None
    config = {contract.QUERY_PROMPT: configured, contract.DOCUMENT_PROMPT: ""}
    assert public_request(texts("q"), None, options, LIMITS, config).instruction == expected


def test_document_instruction_applies_to_documents_only():
    config = {contract.QUERY_PROMPT: "", contract.DOCUMENT_PROMPT: "passage: "}
    assert public_request(None, texts("d", shape=(1, 1)), None, LIMITS, config).instruction == "passage: "
    assert public_request(texts("q"), None, None, LIMITS, config).instruction is None


def test_truncate_is_normalised_and_passed_on():
    forward = public_request(texts("q"), None, params(truncate="start"), LIMITS, NO_CONFIG)
    assert forward.parameters == {contract.TRUNCATE_PARAMETER: "START"}


@pytest.mark.parametrize(
    "query,documents,options,message",
    [
        (texts("q"), texts("d", shape=(1, 1)), None, "not both"),
        (None, None, None, "send one input"),
        (texts("a", "b"), None, None, r"exactly one text"),
        (None, texts(*"abcde", shape=(1, 5)), None, "at most 4"),
        (None, texts("x" * 101, shape=(1, 1)), None, "101 bytes"),
        (None, texts("", shape=(1, 1)), None, "empty string"),
        (texts("q"), None, params(truncate="MIDDLE"), "END, START, NONE"),
        (texts("q"), None, params(temperature="0"), "unknown request parameter 'temperature'"),
        (texts("q"), None, params(cancel_token="0" * 32), "unknown request parameter 'cancel_token'"),
    ],
)
def test_public_refusals_name_the_problem(query, documents, options, message):
    with pytest.raises(InvalidInputError, match=message):
        public_request(query, documents, options, LIMITS, NO_CONFIG)


def test_invalid_utf8_is_refused_with_its_position():
    bad = np.array([[b"ok", b"\xff\xfe"]], dtype=object)
    with pytest.raises(InvalidInputError, match=r"documents\[1\] is not valid UTF-8"):
        public_request(None, bad, None, LIMITS, NO_CONFIG)


def test_encoder_model_setting():
    assert encoder_model_for("nv-embed-v2", "") == "nv-embed-v2-encoder"
    assert encoder_model_for("my-model", "") == "my-model-encoder"
    assert encoder_model_for("nv-embed-v2", "shared-encoder") == "shared-encoder"


# ---- the encoder model ----


def checked(instructions):
    def check(instruction):
        instructions.append(instruction)

    return check


def encoder(text, prompt_names=None, instructions=None, options=None, seen=None):
    return encoder_request(
        text, prompt_names, instructions, options, LIMITS, DEFAULTS.__getitem__, checked(seen if seen is not None else [])
    )


def test_rows_get_their_prompts_and_an_explicit_instruction_wins():
    seen = []
    job = encoder(texts("a", "b", "c", "d", shape=(2, 2)), prompt_names=texts("query", "query", shape=(2, 1)), seen=seen)
    assert job.rows == [["a", "b"], ["c", "d"]] and seen == ["Q: ", "Q: "]
    assert [o.instruction for o in job.options] == ["Q: ", "Q: "]
    job = encoder(texts("a", shape=(1, 1)), texts("query", shape=(1, 1)), texts("own: ", shape=(1, 1)))
    assert [o.instruction for o in job.options] == ["own: "] and job.prompts == [contract.QUERY_PROMPT]


def test_without_prompt_name_or_instruction_a_row_is_a_document():
    job = encoder(texts("a", shape=(1, 1)))
    assert [o.instruction for o in job.options] == [DEFAULTS[contract.DOCUMENT_PROMPT]]
    assert job.prompts == [contract.DOCUMENT_PROMPT]


def test_an_instruction_alone_is_labelled_custom():
    job = encoder(texts("a", shape=(1, 1)), instructions=texts("x: ", shape=(1, 1)))
    assert job.prompts == [CUSTOM_PROMPT] and [o.instruction for o in job.options] == ["x: "]


def test_options_and_cancel_token():
    token = "ab" * 16
    job = encoder(texts("a", shape=(1, 1)), options=params(truncate="none", **{CANCEL_TOKEN_PARAMETER: token}))
    assert job.options == [TextOptions("", contract.TRUNCATE_NONE)] and job.cancel_token == token
    assert encoder(texts("a", shape=(1, 1))).options == [TextOptions("", contract.TRUNCATE_END)]


def test_the_instruction_check_can_refuse():
    def refuse(instruction):
        raise InvalidInputError(f"instruction {instruction!r} is too long")

    with pytest.raises(InvalidInputError, match="too long"):
        encoder_request(texts("a", shape=(1, 1)), None, None, None, LIMITS, DEFAULTS.__getitem__, refuse)


@pytest.mark.parametrize(
    "text,prompt_names,instructions,options,message",
    [
        (None, None, None, None, "send the texts as `text`"),
        (np.empty((1, 0), dtype=object), None, None, None, "empty"),
        (texts("a", shape=(1, 1)), texts("passage", shape=(1, 1)), None, None, "must be one of"),
        (texts("a", "b", shape=(2, 1)), texts("query", shape=(1, 1)), None, None, "one string per row"),
        (texts("a", shape=(1, 1)), None, np.array([[b"\xff"]], dtype=object), None, r"instruction\[0\] is not valid UTF-8"),
        (texts("a", shape=(1, 1)), None, None, params(instruction="x"), "unknown request parameter 'instruction'"),
    ],
)
def test_encoder_refusals_name_the_problem(text, prompt_names, instructions, options, message):
    with pytest.raises(InvalidInputError, match=message):
        encoder(text, prompt_names, instructions, options)


def test_combine_then_split_returns_each_requests_rows_in_order():
    jobs = [
        encoder(texts("a", "b", "c", "d", shape=(2, 2)), prompt_names=texts("query", "document", shape=(2, 1))),
        encoder(texts("e", shape=(1, 1))),
        encoder(texts("f", "g", shape=(1, 2)), options=params(truncate="NONE")),
    ]
    call = combine(jobs)
    assert call.texts == list("abcdefg")
    assert [o.instruction for o in call.options] == ["Q: ", "Q: ", "", "", "", "", ""]
    assert call.owners == [0, 0, 0, 0, 1, 2, 2]
    assert [o.truncate for o in call.options] == ["END"] * 5 + ["NONE"] * 2
    embeddings = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)  # row i: distinct values
    counts = np.arange(10, 17)
    truncated = np.zeros(7, dtype=bool)
    outcomes = split(embeddings, counts, truncated, jobs, set(), 512, "float32")
    assert all(isinstance(o, Answer) for o in outcomes)
    assert outcomes[0].embeddings.shape == (2, 2, 3) and (outcomes[0].embeddings[1, 0] == embeddings[2]).all()
    assert (outcomes[1].embeddings[0, 0] == embeddings[4]).all() and outcomes[1].token_counts.tolist() == [[14]]
    assert outcomes[2].token_counts.dtype == np.int32 and outcomes[2].token_counts.tolist() == [[15, 16]]


def test_split_refuses_abandoned_too_long_and_overflowed_requests_only():
    jobs = [encoder(texts("a", shape=(1, 1))) for _ in range(3)]
    jobs.append(encoder(texts("b", shape=(1, 1)), options=params(truncate="NONE")))
    jobs.append(encoder(texts("c", shape=(1, 1)), options=params(truncate="END")))
    embeddings = np.ones((5, 2), dtype=np.float32)
    embeddings[1] = np.nan  # job 1: dropped by `keep`, so never computed ...
    embeddings[2, 0] = np.inf  # job 2: overflowed
    truncated = np.array([False, False, False, True, True])  # jobs 3 (NONE) and 4 (END) were over max_length
    outcomes = split(embeddings, np.full(5, 600), truncated, jobs, {1}, 512, "float16")
    assert isinstance(outcomes[0], Answer)
    assert outcomes[1] == Refusal("cancelled", "the client cancelled the request")
    assert outcomes[2].reason == "internal" and "overflowed in float16" in outcomes[2].message
    assert outcomes[3].reason == "invalid_input"
    assert "600 tokens" in outcomes[3].message and "max_length 512" in outcomes[3].message
    assert isinstance(outcomes[4], Answer) and outcomes[4].truncated.tolist() == [[True]]
