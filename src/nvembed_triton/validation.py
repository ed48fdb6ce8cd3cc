"""Turning Triton BYTES tensors into checked Python strings. numpy only: the CPU front instances
import this, and they must start fast and stay small."""

from __future__ import annotations

import numpy as np


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
        if not text:
            raise InvalidInputError(f"{input_name}[{position}] is an empty string; every text needs at least one character")
        texts.append(text)
    return texts


def check_document_count(count: int, max_documents: int, input_name: str) -> None:
    if count == 0:
        raise InvalidInputError(f"{input_name} is empty; send between 1 and {max_documents} texts")
    if count > max_documents:
        raise InvalidInputError(
            f"{input_name} holds {count} texts; at most {max_documents} are allowed per request "
            "(parameter max_documents in config.pbtxt); split them over several requests"
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
