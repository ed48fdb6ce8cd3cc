"""The model's request rules (request_rules.py), without Triton: which texts, with which
instruction and options a request becomes, and how a lane's requests share one encode call and get
their rows back."""

import json

import numpy as np
import pytest

from nvembed_triton.model.request_rules import (
    CUSTOM_PROMPT,
    Answer,
    Refusal,
    combine,
    configured_instructions,
    read_request,
    split,
)
from nvembed_triton.protocol import contract
from nvembed_triton.protocol.errors import InvalidInputError
from nvembed_triton.protocol.options import RequestOptions, TextOptions
from nvembed_triton.protocol.validation import RequestLimits

LIMITS = RequestLimits(max_documents=4, max_request_bytes=100)
MODEL_DEFAULTS = {contract.QUERY_PROMPT: "Q: ", contract.DOCUMENT_PROMPT: ""}  # a model's own instructions


def texts(*values, shape=None):
    array = np.array([v.encode() for v in values], dtype=object)
    return array.reshape(shape) if shape else array


def params(**values):
    return json.dumps(values)


def read(query=None, documents=None, options=None, configured=None, check=lambda instruction: None):
    instruction_for = configured_instructions(configured or {}, MODEL_DEFAULTS.__getitem__)
    return read_request(query, documents, json.loads(options or "{}"), LIMITS, instruction_for, check)


def test_a_query_becomes_one_text_with_the_models_own_query_instruction():
    job = read(query=texts("what is x?"))
    assert job.texts == ["what is x?"] and job.prompt == contract.QUERY_PROMPT
    assert job.options == TextOptions("Q: ", contract.TRUNCATE_END) and job.size == len("what is x?")


def test_documents_keep_their_order_and_get_the_document_instruction():
    job = read(documents=texts("a", "b", "c", shape=(1, 3)))
    assert job.texts == ["a", "b", "c"] and job.prompt == contract.DOCUMENT_PROMPT and job.options.instruction == ""


@pytest.mark.parametrize(
    "request_instruction,configured,expected,label",
    [
        (None, "", "Q: ", contract.QUERY_PROMPT),  # nothing set: the model's own
        (None, "cfg: ", "cfg: ", contract.QUERY_PROMPT),  # the configured query_instruction
        ("mine: ", "cfg: ", "mine: ", CUSTOM_PROMPT),  # the request's own wins
        ("", "cfg: ", "", CUSTOM_PROMPT),  # even an empty one: "no instruction" on purpose
    ],
)
def test_instruction_precedence(request_instruction, configured, expected, label):
    options = params(instruction=request_instruction) if request_instruction is not None else None
    job = read(query=texts("q"), options=options, configured={contract.QUERY_PROMPT: configured})
    assert (job.options.instruction, job.prompt) == (expected, label)


def test_document_instruction_applies_to_documents_only():
    configured = {contract.DOCUMENT_PROMPT: "passage: "}
    assert read(documents=texts("d", shape=(1, 1)), configured=configured).options.instruction == "passage: "
    assert read(query=texts("q"), configured=configured).options.instruction == "Q: "


def test_prompt_name_gives_documents_the_query_instruction():
    job = read(documents=texts("q1", "q2", shape=(1, 2)), options=params(prompt_name="query"))
    assert job.options.instruction == "Q: " and job.prompt == contract.QUERY_PROMPT


def test_truncate_is_normalised():
    assert read(query=texts("q"), options=params(truncate="start")).options.truncate == contract.TRUNCATE_START


def test_the_instruction_check_can_refuse_and_sees_the_resolved_instruction():
    seen = []
    read(query=texts("q"), check=seen.append)
    assert seen == ["Q: "]

    def refuse(instruction):
        raise InvalidInputError(f"instruction {instruction!r} is too long")

    with pytest.raises(InvalidInputError, match="too long"):
        read(query=texts("q"), check=refuse)


@pytest.mark.parametrize(
    "query,documents,options,message",
    [
        (texts("q"), texts("d", shape=(1, 1)), None, "not both"),
        (None, None, None, "send one input"),
        (texts("a", "b"), None, None, r"exactly one text"),
        (None, texts(*"abcde", shape=(1, 5)), None, "at most 4"),
        (None, texts("x" * 101, shape=(1, 1)), None, "101 bytes"),
        (None, texts("", shape=(1, 1)), None, "empty string"),
        (texts("q"), None, params(truncate="MIDDLE"), "'END', 'START', 'NONE'"),
        (texts("q"), None, params(prompt_name="passage"), "must be one of 'query', 'document'"),
        (texts("q"), None, params(temperature="0"), "unknown request parameter 'temperature'"),
        (texts("q"), None, json.dumps({"truncate": 1}), "must be a string"),
    ],
)
def test_refusals_name_the_problem(query, documents, options, message):
    with pytest.raises(InvalidInputError, match=message):
        read(query, documents, options)


def test_invalid_utf8_is_refused_with_its_position():
    bad = np.array([[b"ok", b"\xff\xfe"]], dtype=object)
    with pytest.raises(InvalidInputError, match=r"documents\[1\] is not valid UTF-8"):
        read(documents=bad)


def test_options_record_round_trips_through_request_parameters():
    options = RequestOptions(instruction="", truncate="start")
    assert options.parameters() == {"instruction": "", "truncate": "START"}
    assert RequestOptions.from_parameters(options.parameters()) == options
    assert RequestOptions().parameters() == {}


def test_combine_then_split_returns_each_requests_rows_in_order():
    jobs = [
        read(documents=texts("a", "b", shape=(1, 2)), options=params(prompt_name="query")),
        read(documents=texts("c", shape=(1, 1))),
        read(documents=texts("d", "e", shape=(1, 2)), options=params(truncate="NONE")),
    ]
    call = combine(jobs)
    assert call.texts == list("abcde")
    assert [o.instruction for o in call.options] == ["Q: ", "Q: ", "", "", ""]
    assert call.owners == [0, 0, 1, 2, 2]
    assert [o.truncate for o in call.options] == ["END"] * 3 + ["NONE"] * 2
    embeddings = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)  # row i: distinct values
    outcomes = split(embeddings, np.arange(10, 15), np.zeros(5, dtype=bool), jobs, 512, "float32")
    assert all(isinstance(o, Answer) for o in outcomes)
    assert outcomes[0].embeddings.shape == (2, 3) and (outcomes[0].embeddings[1] == embeddings[1]).all()
    assert (outcomes[1].embeddings[0] == embeddings[2]).all() and outcomes[1].token_counts.tolist() == [12]
    assert outcomes[2].token_counts.dtype == np.int32 and outcomes[2].token_counts.tolist() == [13, 14]


def test_split_refuses_too_long_and_overflowed_requests_only():
    jobs = [read(documents=texts("a", shape=(1, 1))) for _ in range(2)]
    jobs.append(read(documents=texts("b", shape=(1, 1)), options=params(truncate="NONE")))
    jobs.append(read(documents=texts("c", shape=(1, 1)), options=params(truncate="END")))
    embeddings = np.ones((4, 2), dtype=np.float32)
    embeddings[1, 0] = np.inf  # job 1: overflowed
    truncated = np.array([False, False, True, True])  # jobs 2 (NONE) and 3 (END) were over max_length
    outcomes = split(embeddings, np.full(4, 600), truncated, jobs, 512, "float16")
    assert isinstance(outcomes[0], Answer)
    assert outcomes[1].reason == "internal" and "overflowed in float16" in outcomes[1].message
    assert isinstance(outcomes[2], Refusal) and outcomes[2].reason == "invalid_input"
    assert "600 tokens" in outcomes[2].message and "max_length 512" in outcomes[2].message
    assert isinstance(outcomes[3], Answer) and outcomes[3].truncated.tolist() == [True]
