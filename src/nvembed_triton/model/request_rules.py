"""What the model does with a request, as pure functions of numpy arrays: which texts, with which
options (read_request); how the requests a lane takes share one encode call (combine), and how its
result goes back to each (split). model.py only moves tensors in and out of Triton."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from nvembed_triton.protocol import contract
from nvembed_triton.protocol.errors import InvalidInputError
from nvembed_triton.protocol.options import RequestOptions, TextOptions
from nvembed_triton.protocol.validation import RequestLimits, decode_texts

CUSTOM_PROMPT = "custom"  # the metrics' prompt label for texts sent with the request's own instruction


@dataclass(frozen=True)
class Job:
    """One request's work: its texts, all embedded with the same options."""

    texts: list[str]
    options: TextOptions
    prompt: str  # the prompt name, or CUSTOM_PROMPT (the metrics' label)
    size: int  # UTF-8 bytes of text


def read_request(
    query: np.ndarray | None,
    documents: np.ndarray | None,
    parameters: Mapping[str, object],
    limits: RequestLimits,
    instruction_for: Callable[[str], str],
    check_instruction: Callable[[str], None],
) -> Job:
    """A request (exactly one of `query` [1] and `documents` [1, N]), decoded and checked once. Its
    prompt: the `prompt_name` parameter, else the input's (query or document). Its instruction: the
    request's own `instruction` parameter (even ""), else `instruction_for(prompt)` (the configured
    query_instruction / document_instruction, else the model's own)."""
    options = RequestOptions.from_parameters(parameters)
    if query is not None and documents is not None:
        raise InvalidInputError("send either `query` or `documents`, not both in the same request")
    if query is None and documents is None:
        raise InvalidInputError(
            "send one input: `query` (BYTES, shape [1]: one query text) or `documents` (BYTES, shape [1, N]: N document texts)"
        )
    if query is not None:
        array, name, prompt = query, contract.QUERY_INPUT, options.prompt_name or contract.QUERY_PROMPT
        if array.size != 1:
            raise InvalidInputError(f"`query` must hold exactly one text (shape [1]), got shape {list(array.shape)}")
    else:
        array, name, prompt = documents, contract.DOCUMENTS_INPUT, options.prompt_name or contract.DOCUMENT_PROMPT
    size = limits.check(array, name)
    texts = decode_texts(array, name)
    instruction = options.instruction if options.instruction is not None else instruction_for(prompt)
    check_instruction(instruction)
    text_options = TextOptions(instruction=instruction, truncate=options.truncate or contract.TRUNCATE_END)
    return Job(texts, text_options, CUSTOM_PROMPT if options.instruction is not None else prompt, size)


def configured_instructions(configured: Mapping[str, str], model_default: Callable[[str], str]) -> Callable[[str], str]:
    """A prompt's instruction: the configured one (query_instruction, document_instruction) if not
    empty, else the model's own."""
    return lambda prompt: configured.get(prompt) or model_default(prompt)


@dataclass(frozen=True)
class EncodeCall:
    """Every text of the jobs a lane took, in order, for one encode call (so the token-budget
    planner packs across requests)."""

    texts: list[str]
    options: list[TextOptions]  # options[i]: text i's
    owners: list[int]  # owners[i]: the position in `jobs` of text i


def combine(jobs: list[Job]) -> EncodeCall:
    call = EncodeCall([], [], [])
    for position, job in enumerate(jobs):
        call.texts.extend(job.texts)
        call.options.extend([job.options] * len(job.texts))
        call.owners.extend([position] * len(job.texts))
    return call


@dataclass(frozen=True)
class Answer:
    embeddings: np.ndarray  # [N, D]
    token_counts: np.ndarray  # [N] int32
    truncated: np.ndarray  # [N] bool


@dataclass(frozen=True)
class Refusal:
    reason: str  # a reasons.REASONS key: the Triton error code and the metrics' label
    message: str


def split(
    embeddings: np.ndarray, token_counts: np.ndarray, truncated: np.ndarray, jobs: list[Job], max_length: int, dtype: str
) -> list[Answer | Refusal]:
    """The encode call's rows back to their jobs, in order; each gets its answer or why not. (A job
    already answered, e.g. cancelled between passes, gets an outcome too, which is never sent.)"""
    outcomes: list[Answer | Refusal] = []
    start = 0
    for job in jobs:
        span = slice(start, start + len(job.texts))
        start = span.stop
        too_long = np.flatnonzero(truncated[span]) if job.options.truncate == contract.TRUNCATE_NONE else []
        if len(too_long):
            first = int(too_long[0])
            outcomes.append(Refusal("invalid_input", (
                f"text {first} is {token_counts[span][first]} tokens (or more), over max_length {max_length}, "
                "and truncate is NONE; shorten it or send truncate END or START"
            )))  # fmt: skip
        elif not np.isfinite(embeddings[span]).all():  # an activation overflowed the dtype: never hand out a NaN vector
            overflow = f"the model overflowed in {dtype} on this input; serve it with dtype bf16 or fp32"
            outcomes.append(Refusal("internal", overflow))
        else:
            outcomes.append(Answer(embeddings[span], token_counts[span].astype(np.int32), truncated[span]))
    return outcomes
