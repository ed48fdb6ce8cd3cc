"""Per-request options in one record that parses and checks itself from every front's names
(RequestOptions), and what the encoders receive for each text once the request's instruction is
resolved (TextOptions).

A new option is a field of RequestOptions declared with `option(...)` (its help, its choices, its
name on each front that offers it), and its effect where the model resolves TextOptions
(model/request_rules.py) and in the encoders. The gRPC parameter, the Python client's keyword, the
OpenAI/NIM body's field, the corpus command's flag and the docs' options table all follow from the
declaration."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from nvembed_triton.protocol import contract
from nvembed_triton.protocol.errors import InvalidInputError


@dataclass(frozen=True)
class Names:
    """One option's names on the fronts (None: that front does not offer it) and its accepted values."""

    help: str
    client: str  # the Python client's keyword
    flag: str | None = None  # the corpus command's flag
    openai: str | None = None  # the OpenAI/NIM body's field
    openai_values: Mapping[str, str] | None = None  # that field's values, each mapped to ours
    choices: tuple[str, ...] | None = None  # None: any string
    normalise: Callable[[str], str] = str  # applied before the choices are checked


def option(names: Names) -> Any:
    return field(default=None, metadata={"names": names})


@dataclass(frozen=True)
class RequestOptions:
    """A request's options, under their gRPC request-parameter names. None: not set, the server's
    default applies."""

    instruction: str | None = option(Names(
        "this request's instruction instead of the server's (\"\" for none), masked from the mean as the default one",
        client="prompt", flag="--instruction",
    ))  # fmt: skip
    prompt_name: str | None = option(Names(
        "whose configured instruction the texts get (default: the input's own): `query` embeds N queries in one "
        "`documents` request; an `instruction` still wins",
        client="prompt_name", flag="--prompt-name", choices=contract.PROMPT_NAMES,
        openai="input_type", openai_values={"query": contract.QUERY_PROMPT, "passage": contract.DOCUMENT_PROMPT,
                                            "document": contract.DOCUMENT_PROMPT},
    ))  # fmt: skip
    truncate: str | None = option(Names(
        "a text over max_length tokens: END keeps its start (the default), START its end (BOS and instruction stay), "
        "NONE refuses it naming its index and token count; any case",
        client="truncate", flag="--truncate", openai="truncate", choices=contract.TRUNCATIONS, normalise=str.upper,
    ))  # fmt: skip

    def __post_init__(self):
        for name, names in declared().items():
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, str):
                raise InvalidInputError(f"option {name!r} must be a string, got {value!r}")
            object.__setattr__(self, name, value := names.normalise(value))
            if names.choices is not None and value not in names.choices:
                allowed = ", ".join(map(repr, names.choices))
                raise InvalidInputError(f"option {name!r} must be one of {allowed}, got {value!r}")

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, object]) -> RequestOptions:
        """From a gRPC/KServe request's parameters (the Python backend's request.parameters())."""
        unknown = sorted(set(parameters) - set(declared()))
        if unknown:
            takes = ", ".join(map(repr, declared()))
            raise InvalidInputError(f"unknown request parameter {unknown[0]!r}; this model takes {takes}")
        return cls(**parameters)

    @classmethod
    def from_client(cls, **keywords: str | None) -> RequestOptions:
        """From the Python client's keywords (sentence-transformers' `prompt` for the instruction)."""
        by_keyword = {names.client: name for name, names in declared().items()}
        unknown = sorted(set(keywords) - set(by_keyword))
        if unknown:
            raise TypeError(f"unexpected keyword {unknown[0]!r}; the options are {', '.join(by_keyword)}")
        return cls(**{by_keyword[keyword]: value for keyword, value in keywords.items()})

    @classmethod
    def from_openai(cls, body: Mapping[str, Any]) -> RequestOptions:
        """From an OpenAI/NIM body's fields (null and "" mean not set, as clients send them)."""
        values = {}
        for name, names in declared().items():
            value = body.get(names.openai) if names.openai else None
            if value is None or value == "":
                continue
            if names.openai_values is not None:
                if value not in names.openai_values:
                    allowed = ", ".join(map(repr, names.openai_values))
                    raise InvalidInputError(f"`{names.openai}` must be one of {allowed}, got {value!r}")
                value = names.openai_values[value]
            values[name] = value
        return cls(**values)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The options as a command's flags (the corpus embedder's)."""
        for name, names in declared().items():
            if names.flag:
                parser.add_argument(
                    names.flag, dest=f"option_{name}", type=names.normalise, choices=names.choices, help=names.help
                )

    @classmethod
    def from_arguments(cls, arguments: argparse.Namespace) -> RequestOptions:
        return cls(**{name: getattr(arguments, f"option_{name}", None) for name in declared()})

    def parameters(self) -> dict[str, str]:
        """The options that are set, as request parameters (what clients send)."""
        return {name: value for name in declared() if (value := getattr(self, name)) is not None}

    def client_keywords(self) -> dict[str, str]:
        """The options that are set, as the Python client's keywords."""
        names = declared()
        return {names[name].client: value for name, value in self.parameters().items()}


@functools.cache
def declared() -> dict[str, Names]:
    """Every option's names, by field name, in declaration order."""
    return {each.name: each.metadata["names"] for each in fields(RequestOptions)}


@dataclass(frozen=True)
class TextOptions:
    """How the encoders embed one text."""

    instruction: str = ""  # put before the text; NV-Embed-v2 leaves its tokens out of the mean
    truncate: str = contract.TRUNCATE_END  # a text over max_length: END keeps its start, START its end, NONE refuses it

    @classmethod
    def each(cls, count: int, **options: str) -> list[TextOptions]:
        """The same options for `count` texts."""
        return [cls(**options)] * count
