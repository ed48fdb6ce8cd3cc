"""What each model does with a request, as pure functions of numpy arrays: which texts, which
instruction, which options; how an encoder call's requests share one encode call and how its
result is split back. The model.py files only move tensors in and out of Triton. numpy only: the
front instances import this."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from nvembed_triton.protocol import contract
from nvembed_triton.protocol.errors import InvalidInputError
from nvembed_triton.protocol.lifecycle import CANCEL_TOKEN_PARAMETER, CANCELLED_MESSAGE
from nvembed_triton.protocol.options import TextOptions
from nvembed_triton.protocol.validation import RequestLimits, decode_one, decode_texts, request_options

PUBLIC_OPTIONS = (contract.INSTRUCTION_PARAMETER, contract.TRUNCATE_PARAMETER, contract.PROMPT_NAME_PARAMETER)
# The public request's parameters that the encoder's request carries on as they are.
FORWARDED_OPTIONS = (contract.TRUNCATE_PARAMETER,)
ENCODER_OPTIONS = (contract.TRUNCATE_PARAMETER, CANCEL_TOKEN_PARAMETER)
CUSTOM_PROMPT = "custom"  # the metrics' prompt label for a text sent with its own instruction


def encoder_model_for(public_model: str, configured: str) -> str:
    """The model a public model forwards to: the encoder_model setting, else `<name>-encoder`."""
    return configured or contract.encoder_model_name(public_model)


@dataclass(frozen=True)
class Forward:
    """What the public model sends the encoder for one request."""

    texts: np.ndarray  # the request's BYTES, checked, shaped [1, N]
    prompt_name: str
    instruction: str | None  # None: the encoder's own for prompt_name
    parameters: dict[str, str]  # the encoder request's parameters (FORWARDED_OPTIONS the request set)


def public_request(
    query: np.ndarray | None,
    documents: np.ndarray | None,
    parameters_json: str | None,
    limits: RequestLimits,
    configured_instructions: Mapping[str, str],
) -> Forward:
    """A public request (exactly one of `query` [1] and `documents` [1, N]) as the encoder request
    it becomes. Its prompt: the `prompt_name` parameter, else the input's (query or document). The
    instruction: the request's own `instruction` parameter (even ""), else the configured
    query_instruction / document_instruction of its prompt, else (both empty) the model's own."""
    options = request_options(parameters_json, PUBLIC_OPTIONS)
    prompt_name = options.get(contract.PROMPT_NAME_PARAMETER)
    if prompt_name is not None and prompt_name not in contract.PROMPT_NAMES:
        allowed = ", ".join(map(repr, contract.PROMPT_NAMES))
        raise InvalidInputError(f"request parameter 'prompt_name' must be one of {allowed}, got {prompt_name!r}")
    if query is not None and documents is not None:
        raise InvalidInputError("send either `query` or `documents`, not both in the same request")
    if query is None and documents is None:
        raise InvalidInputError(
            "send one input: `query` (BYTES, shape [1]: one query text) or `documents` (BYTES, shape [1, N]: N document texts)"
        )
    if query is not None:
        texts, name, prompt_name = query, contract.QUERY_INPUT, prompt_name or contract.QUERY_PROMPT
        if texts.size != 1:
            raise InvalidInputError(f"`query` must hold exactly one text (shape [1]), got shape {list(texts.shape)}")
    else:
        texts, name, prompt_name = documents, contract.DOCUMENTS_INPUT, prompt_name or contract.DOCUMENT_PROMPT
    limits.check(texts, name)
    decode_texts(texts, name)  # refused here, in the parallel front instances, not in the encoder
    instruction = options.get(contract.INSTRUCTION_PARAMETER, configured_instructions.get(prompt_name) or None)
    forwarded = {name: options[name] for name in FORWARDED_OPTIONS if name in options}
    return Forward(texts.reshape(1, -1), prompt_name, instruction, forwarded)


@dataclass(frozen=True)
class EncoderJob:
    """One encoder request's share of an execute() call."""

    rows: list[list[str]]  # [B][N] texts
    options: list[TextOptions]  # one per row: every text of a row is embedded with them
    prompts: list[str]  # per row: the prompt name, or CUSTOM_PROMPT (for the metrics)
    cancel_token: str | None

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), len(self.rows[0])


def encoder_request(
    text: np.ndarray | None,
    prompt_names: np.ndarray | None,
    instructions: np.ndarray | None,
    parameters_json: str | None,
    limits: RequestLimits,
    default_instruction: Callable[[str], str],
    check_instruction: Callable[[str], None],
) -> EncoderJob:
    """An encoder request (`text` [B, N], optional `prompt_name` and `instruction` [B, 1]). Per
    row, an explicit instruction wins over prompt_name; with neither a row is a document."""
    options = request_options(parameters_json, ENCODER_OPTIONS)
    if text is None:
        raise InvalidInputError(f"send the texts as `{contract.TEXT_INPUT}` (BYTES, shape [B, N])")
    limits.check(text, contract.TEXT_INPUT)
    rows = [decode_texts(row, f"{contract.TEXT_INPUT}[{i}]") for i, row in enumerate(text.reshape(text.shape[0], -1))]
    if not rows[0]:
        raise InvalidInputError(f"`{contract.TEXT_INPUT}` is empty; send at least one text")
    resolved, prompts = [], []
    for prompt_name, instruction in zip(
        _per_row(prompt_names, contract.PROMPT_NAME_INPUT, len(rows)),
        _per_row(instructions, contract.INSTRUCTION_INPUT, len(rows)),
        strict=True,
    ):
        if prompt_name is not None and prompt_name not in contract.PROMPT_NAMES:
            raise InvalidInputError(f"`prompt_name` must be one of {list(contract.PROMPT_NAMES)}, got {prompt_name!r}")
        if instruction is None:
            prompt_name = prompt_name or contract.DOCUMENT_PROMPT
            instruction = default_instruction(prompt_name)
        check_instruction(instruction)
        resolved.append(instruction)
        prompts.append(prompt_name or CUSTOM_PROMPT)
    truncate = options.get(contract.TRUNCATE_PARAMETER, contract.TRUNCATE_END)
    text_options = [TextOptions(instruction=instruction, truncate=truncate) for instruction in resolved]
    return EncoderJob(rows, text_options, prompts, options.get(CANCEL_TOKEN_PARAMETER))


def _per_row(array: np.ndarray | None, name: str, rows: int) -> list[str | None]:
    if array is None:
        return [None] * rows
    if array.size != rows:
        raise InvalidInputError(f"`{name}` must hold one string per row of `{contract.TEXT_INPUT}` ({rows}), got {array.size}")
    return [decode_one(value, f"{name}[{i}]") for i, value in enumerate(array.reshape(-1))]


@dataclass(frozen=True)
class EncodeCall:
    """Every text of an execute() call's requests, in order, for one encode call (so the
    token-budget planner packs across requests)."""

    texts: list[str]
    options: list[TextOptions]  # options[i]: text i's
    owners: list[int]  # owners[i]: the position in `jobs` of text i


def combine(jobs: list[EncoderJob]) -> EncodeCall:
    call = EncodeCall([], [], [])
    for position, job in enumerate(jobs):
        for row, options in zip(job.rows, job.options, strict=True):
            call.texts.extend(row)
            call.options.extend([options] * len(row))
            call.owners.extend([position] * len(row))
    return call


@dataclass(frozen=True)
class Answer:
    embeddings: np.ndarray  # [B, N, D]
    token_counts: np.ndarray  # [B, N] int32
    truncated: np.ndarray  # [B, N] bool


@dataclass(frozen=True)
class Refusal:
    reason: str  # a reasons.REASONS key; the error message starts with it
    message: str


def split(
    embeddings: np.ndarray,
    token_counts: np.ndarray,
    truncated: np.ndarray,
    jobs: list[EncoderJob],
    abandoned: set[int],
    max_length: int,
    dtype: str,
) -> list[Answer | Refusal]:
    """The encode call's rows back to their requests, in order; each gets its answer or why not."""
    outcomes: list[Answer | Refusal] = []
    start = 0
    for position, job in enumerate(jobs):
        shape = job.shape
        span = slice(start, start + shape[0] * shape[1])
        start = span.stop
        refuses_long = np.repeat([options.truncate == contract.TRUNCATE_NONE for options in job.options], shape[1])
        too_long = np.flatnonzero(truncated[span] & refuses_long)
        vectors = embeddings[span].reshape(*shape, -1)
        if position in abandoned:
            outcomes.append(Refusal("cancelled", CANCELLED_MESSAGE))
        elif len(too_long):
            first = int(too_long[0])
            outcomes.append(Refusal("invalid_input", (
                f"text {first} is {token_counts[span][first]} tokens (or more), over max_length {max_length}, "
                "and truncate is NONE; shorten it or send truncate END or START"
            )))  # fmt: skip
        elif not np.isfinite(vectors).all():  # an activation overflowed the dtype: never hand out a NaN vector
            overflow = f"the model overflowed in {dtype} on this input; serve it with dtype bf16 or fp32"
            outcomes.append(Refusal("internal", overflow))
        else:
            outcomes.append(Answer(vectors, token_counts[span].reshape(shape).astype(np.int32), truncated[span].reshape(shape)))
    return outcomes
