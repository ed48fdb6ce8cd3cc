"""Turning Triton BYTES tensors into checked Python strings, within the request limits. numpy only."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from nvembed_triton.protocol.errors import InvalidInputError

BYTE_ORDER_MARK = "\ufeff"  # an encoding artefact, not text: the reference tokenizer would embed it


def decode_one(value: bytes | str, where: str) -> str:
    """One BYTES element as a str; undecodable bytes are an error naming where they were."""
    raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidInputError(
            f"{where} is not valid UTF-8 ({error.reason} at byte {error.start}); texts must be UTF-8 encoded strings"
        ) from None


def decode_texts(array: np.ndarray, input_name: str) -> list[str]:
    """The UTF-8 strings of a BYTES tensor, in order. Empty or undecodable texts are errors that
    name the input and the position, because silently embedding them would give garbage."""
    texts = []
    for position, value in enumerate(array.reshape(-1)):
        text = decode_one(value, f"{input_name}[{position}]").removeprefix(BYTE_ORDER_MARK)
        if not text:
            raise InvalidInputError(f"{input_name}[{position}] is an empty string; every text needs at least one character")
        texts.append(text)
    return texts


@dataclass(frozen=True)
class RequestLimits:
    """What one request may hold (settings max_documents and max_request_bytes)."""

    max_documents: int
    max_request_bytes: int  # UTF-8 bytes of text; a 32k-token document is ~130 KB

    @classmethod
    def from_settings(cls, values: Mapping[str, Any]) -> RequestLimits:
        """From a model's settings (settings.model_settings)."""
        return cls(max_documents=values["max_documents"], max_request_bytes=values["max_request_bytes"])

    def check(self, array: np.ndarray, input_name: str) -> int:
        """Before anything is decoded: the number of texts and their total size in bytes (returned)."""
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
        return size
