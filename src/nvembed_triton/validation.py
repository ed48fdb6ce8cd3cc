"""Turning Triton BYTES tensors into checked Python strings. numpy only: the CPU front instances
import this, and they must start fast and stay small."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .settings import positive_int

BYTE_ORDER_MARK = "\ufeff"  # an encoding artefact, not text: the reference tokenizer would embed it


class InvalidInputError(ValueError):
    """A request the client must fix; sent back as INVALID_ARGUMENT, the server carries on."""


def decode_texts(array: np.ndarray, input_name: str) -> list[str]:
    """The UTF-8 strings of a BYTES tensor, in order. Empty or undecodable texts are errors that
    name the input and the position, because silently embedding them would give garbage."""
    texts = []
    for position, value in enumerate(array.reshape(-1)):
        raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise InvalidInputError(
                f"{input_name}[{position}] is not valid UTF-8 ({error.reason} at byte {error.start}); "
                "texts must be UTF-8 encoded strings"
            ) from None
        text = text.removeprefix(BYTE_ORDER_MARK)
        if not text:
            raise InvalidInputError(f"{input_name}[{position}] is an empty string; every text needs at least one character")
        texts.append(text)
    return texts


def request_options(parameters_json: str | None, allowed: tuple[str, ...]) -> dict[str, str]:
    """A request's KServe parameters (the JSON the Python backend gives): only `allowed` names,
    string values; `truncate` upper-cased and checked."""
    from .contract import TRUNCATE_PARAMETER, TRUNCATIONS

    options = json.loads(parameters_json or "{}")
    for name, value in options.items():
        if name not in allowed:
            raise InvalidInputError(f"unknown request parameter {name!r}; this model takes {', '.join(map(repr, allowed))}")
        if not isinstance(value, str):
            raise InvalidInputError(f"request parameter {name!r} must be a string, got {value!r}")
    if TRUNCATE_PARAMETER in options:
        options[TRUNCATE_PARAMETER] = options[TRUNCATE_PARAMETER].upper()
        if options[TRUNCATE_PARAMETER] not in TRUNCATIONS:
            given = options[TRUNCATE_PARAMETER]
            raise InvalidInputError(f"request parameter 'truncate' must be one of {', '.join(TRUNCATIONS)}, got {given!r}")
    return options


@dataclass(frozen=True)
class RequestLimits:
    """What one request may hold, on both models: config.pbtxt parameters, which clients read (the
    Python client splits its input by them), so no environment override."""

    max_documents: int = 1024
    max_request_bytes: int = 16 * 2**20  # UTF-8 bytes of text; a 32k-token document is ~130 KB

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> RequestLimits:
        return cls(
            max_documents=positive_int(parameters, "max_documents", cls.max_documents),
            max_request_bytes=positive_int(parameters, "max_request_bytes", cls.max_request_bytes),
        )

    def check(self, array: np.ndarray, input_name: str) -> None:
        """Before anything is decoded: the number of texts and their total size in bytes."""
        count = array.size
        if count == 0:
            raise InvalidInputError(f"{input_name} is empty; send between 1 and {self.max_documents} texts")
        if count > self.max_documents:
            raise InvalidInputError(
                f"{input_name} holds {count} texts; at most {self.max_documents} are allowed per request "
                "(parameter max_documents); split them over several requests"
            )
        size = sum(len(value) for value in array.reshape(-1))
        if size > self.max_request_bytes:
            raise InvalidInputError(
                f"{input_name} holds {size} bytes of text; at most {self.max_request_bytes} are allowed per request "
                "(parameter max_request_bytes); split them over several requests"
            )


def decode_single(array: np.ndarray | None, input_name: str) -> str | None:
    """One optional string input (e.g. `prompt_name`), or None when absent."""
    if array is None:
        return None
    if array.size != 1:
        raise InvalidInputError(f"{input_name} must hold exactly one string, got shape {list(array.shape)}")
    value = array.reshape(-1)[0]
    raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInputError(f"{input_name} is not valid UTF-8") from None
