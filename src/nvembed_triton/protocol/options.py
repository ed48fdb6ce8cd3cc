"""Per-request options in one record that parses and checks itself (RequestOptions), and what the
encoders receive for each text once the request's instruction is resolved (TextOptions).

A new option is a field of RequestOptions with its check in `from_parameters`, its effect in the
encoders (through TextOptions, if it changes how a text is embedded), and its name on each front
that offers it (the Python client's keyword, the OpenAI body's field)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from nvembed_triton.protocol import contract
from nvembed_triton.protocol.errors import InvalidInputError


@dataclass(frozen=True)
class RequestOptions:
    """A request's options, under their KServe request-parameter names (contract.*_PARAMETER). None:
    not set, the server's default applies."""

    instruction: str | None = None  # the request's own instruction, even "": wins over prompt_name's
    prompt_name: str | None = None  # query or document: whose instruction the texts get (default: the input's)
    truncate: str | None = None  # END (the default), START or NONE, any case

    def __post_init__(self):
        if self.prompt_name is not None and self.prompt_name not in contract.PROMPT_NAMES:
            allowed = ", ".join(map(repr, contract.PROMPT_NAMES))
            raise InvalidInputError(f"request parameter 'prompt_name' must be one of {allowed}, got {self.prompt_name!r}")
        if self.truncate is not None:
            object.__setattr__(self, "truncate", self.truncate.upper())
            if self.truncate not in contract.TRUNCATIONS:
                allowed = ", ".join(contract.TRUNCATIONS)
                raise InvalidInputError(f"request parameter 'truncate' must be one of {allowed}, got {self.truncate!r}")

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, object]) -> RequestOptions:
        """From a request's parameters (the Python backend's request.parameters(), as a dict): only
        this record's names, string values."""
        names = [field.name for field in fields(cls)]
        for name, value in parameters.items():
            if name not in names:
                raise InvalidInputError(f"unknown request parameter {name!r}; this model takes {', '.join(map(repr, names))}")
            if not isinstance(value, str):
                raise InvalidInputError(f"request parameter {name!r} must be a string, got {value!r}")
        return cls(**parameters)

    def parameters(self) -> dict[str, str]:
        """The options that are set, as request parameters (what clients send)."""
        return {field.name: value for field in fields(self) if (value := getattr(self, field.name)) is not None}


@dataclass(frozen=True)
class TextOptions:
    """How the encoders embed one text."""

    instruction: str = ""  # put before the text; NV-Embed-v2 leaves its tokens out of the mean
    truncate: str = contract.TRUNCATE_END  # a text over max_length: END keeps its start, START its end, NONE refuses it

    @classmethod
    def each(cls, count: int, **options: str) -> list[TextOptions]:
        """The same options for `count` texts."""
        return [cls(**options)] * count
