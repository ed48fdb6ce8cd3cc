"""The per-request options are one record (protocol/options.py): every front parses its own names
into it, each value is checked once there, and a new option declared in it reaches every front."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import pytest

from nvembed_triton.openai_api.schemas import parse_embedding_request
from nvembed_triton.protocol import options as options_module
from nvembed_triton.protocol.errors import InvalidInputError
from nvembed_triton.protocol.options import Names, RequestOptions, declared, option

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import reference_tables  # noqa: E402


def test_every_front_gives_the_same_record():
    expected = RequestOptions(instruction="Instruct: x\nQuery: ", prompt_name="query", truncate="START")
    parameters = {"instruction": "Instruct: x\nQuery: ", "prompt_name": "query", "truncate": "start"}
    assert RequestOptions.from_parameters(parameters) == expected
    assert RequestOptions.from_client(prompt="Instruct: x\nQuery: ", prompt_name="query", truncate="Start") == expected
    cli = argparse.ArgumentParser()
    RequestOptions.add_arguments(cli)
    arguments = cli.parse_args(["--instruction", "Instruct: x\nQuery: ", "--prompt-name", "query", "--truncate", "start"])
    assert RequestOptions.from_arguments(arguments) == expected
    # NIM names the prompt input_type, with its own values; it has no instruction field
    body = {"input_type": "query", "truncate": "start", "instruction": "ignored"}
    assert RequestOptions.from_openai(body) == dataclasses.replace(expected, instruction=None)
    assert RequestOptions.from_openai({"input_type": "passage"}).prompt_name == "document"
    assert RequestOptions.from_openai({"input_type": None, "truncate": ""}) == RequestOptions()
    assert expected.client_keywords() == {"prompt": "Instruct: x\nQuery: ", "prompt_name": "query", "truncate": "START"}


@pytest.mark.parametrize(
    ("parse", "message"),
    [
        (lambda: RequestOptions.from_parameters({"truncate": "MIDDLE"}), "'truncate' must be one of 'END', 'START', 'NONE'"),
        (lambda: RequestOptions.from_client(prompt_name="passage"), "'prompt_name' must be one of 'query', 'document'"),
        (lambda: RequestOptions.from_openai({"input_type": "search"}), "`input_type` must be one of 'query', 'passage'"),
        (lambda: RequestOptions.from_parameters({"temperature": "0"}), "unknown request parameter 'temperature'"),
        (lambda: RequestOptions.from_parameters({"truncate": 1}), "must be a string"),
    ],
)
def test_a_bad_value_is_refused_naming_it(parse, message):
    with pytest.raises(InvalidInputError, match=message):
        parse()


def test_an_unknown_client_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="unexpected keyword 'instruction'.*prompt"):
        RequestOptions.from_client(instruction="x")


def test_the_openai_schema_takes_its_fields_from_the_record():
    asked = parse_embedding_request(b'{"model": "m", "input": "x", "input_type": "query", "truncate": "none"}')
    assert RequestOptions.from_openai(asked.model_dump()) == RequestOptions(prompt_name="query", truncate="NONE")
    with pytest.raises(Exception, match="input_type"):
        parse_embedding_request(b'{"model": "m", "input": "x", "input_type": "search"}')


def test_a_new_option_is_one_declaration(monkeypatch):
    """A field added to the record is parsed from every front's name for it and listed in the docs'
    table; nothing else changes."""

    @dataclasses.dataclass(frozen=True)
    class WithDimensions(RequestOptions):
        dimensions: str | None = option(Names("keep the first N dimensions", client="dimensions", flag="--dimensions",
                                              openai="dimensions"))  # fmt: skip

    monkeypatch.setattr(options_module, "RequestOptions", WithDimensions)
    declared.cache_clear()
    try:
        assert WithDimensions.from_parameters({"dimensions": "512"}).dimensions == "512"
        assert WithDimensions.from_client(dimensions="512").dimensions == "512"
        assert WithDimensions.from_openai({"dimensions": "512"}).dimensions == "512"
        cli = argparse.ArgumentParser()
        WithDimensions.add_arguments(cli)
        assert WithDimensions.from_arguments(cli.parse_args(["--dimensions", "512"])).dimensions == "512"
        assert WithDimensions(dimensions="512").parameters() == {"dimensions": "512"}
        assert "| `dimensions` | `dimensions=` | `dimensions` | `--dimensions` | any text | keep the first N" in (
            reference_tables.options_table()
        )
    finally:
        declared.cache_clear()
