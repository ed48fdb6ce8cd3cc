"""The bodies of the OpenAI/NIM-compatible embeddings API as pydantic models, and a request body
parsed into its model: bounded before anything is built, every refusal naming its field."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model
from pydantic_core import PydanticCustomError

from nvembed_triton.protocol.options import declared

MAX_INPUTS = 2048  # OpenAI's own limit per request
# Parsed JSON costs up to ~90 times its bytes (33 MB of `{},` took 2.9 GB to parse and validate here,
# 0.8 GB with json.loads), so a body's structure is bounded before it is parsed: its JSON values
# (about 2 per text: the string and a comma) and its nesting (a request is 2 deep: {"input": [...]}).
MAX_JSON_VALUES = 5 * MAX_INPUTS
MAX_JSON_DEPTH = 16
NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


class ApiError(Exception):
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}

    def body(self) -> ErrorBody:
        kind = "invalid_request_error" if self.status < 500 and self.status != 429 else "server_error"
        return ErrorBody(error=ErrorDetail(message=self.message, type=kind, param=self.param, code=self.code))


def _or_default(default: str, normalise=lambda value: value) -> BeforeValidator:
    """null and "" mean the default, as clients send them for "unset"."""
    return BeforeValidator(lambda value: default if value is None or value == "" else normalise(value))


def _texts(value: Any) -> Any:
    """A str is one text; OpenAI's token-id arrays are refused by name."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and any(
        isinstance(item, int) or (isinstance(item, list) and all(isinstance(t, int) for t in item)) for item in value
    ):
        raise PydanticCustomError("token_ids", "token-id arrays are not supported: send the text itself")
    return value


Texts = Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_INPUTS), BeforeValidator(_texts)]


class OpenAIFields(BaseModel):
    """POST /v1/embeddings: OpenAI's own fields. Other fields are ignored."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: str
    input: Texts
    encoding_format: Annotated[Literal["float", "base64"], _or_default("float")] = "float"
    dimensions: int | None = None
    user: str | None = None


def _option_field(names) -> tuple[Any, Any]:
    """A per-request option's field (protocol/options.py): null and "" mean not set; its values as
    this front names them (NIM's input_type: query, passage or document)."""
    values = tuple(names.openai_values or names.choices or ())
    kind = Literal[values] if values else str
    normalise = BeforeValidator(lambda v: None if v is None or v == "" else names.normalise(v) if isinstance(v, str) else v)
    return Annotated[kind | None, normalise, Field(description=names.help)], None


# OpenAI's fields and the per-request options NIM also takes (input_type, truncate).
EmbeddingRequest = create_model(
    "EmbeddingRequest", __base__=OpenAIFields,
    **{names.openai: _option_field(names) for names in declared().values() if names.openai},
)  # fmt: skip


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32, as OpenAI sends it


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "nvembed-triton"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


def check_json_bounds(body: bytes) -> None:
    """Counts values and depth on the body with its strings cut out, by bytes operations that run
    in C: a hostile 33 MB body costs milliseconds and no parsing. Escaped backslashes, then escaped
    quotes, are dropped first, so every quote left opens or closes a string. Invalid JSON that
    passes is left to the parser."""
    plain = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    if plain.count(b'"') > 2 * MAX_JSON_VALUES:
        raise ApiError(400, f"the request body holds over {MAX_JSON_VALUES} strings; send at most {MAX_INPUTS} texts")
    outside = b"".join(plain.split(b'"')[0::2])
    brackets = outside.translate(None, NOT_BRACKETS)
    if len(brackets) + outside.count(b",") > MAX_JSON_VALUES:
        raise ApiError(400, f"the request body holds over {MAX_JSON_VALUES} JSON values; send at most {MAX_INPUTS} texts")
    depth = 0
    for char in brackets:
        depth += 1 if char in b"[{" else -1
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"the request body is nested deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")


def parse_embedding_request(body: bytes | bytearray) -> EmbeddingRequest:
    check_json_bounds(body)
    try:
        return EmbeddingRequest.model_validate_json(body)
    except ValidationError as error:
        raise _api_error(error.errors(include_url=False, include_input=False)[0]) from None


def _api_error(error: dict) -> ApiError:
    """pydantic's first complaint as a 400 naming the field (its message never quotes the input)."""
    if error["type"] == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {error['msg']}", code="invalid_json")
    location = error["loc"]
    if not location:
        return ApiError(400, "the request body must be a JSON object")
    where = f"{location[0]}" + "".join(f"[{part}]" for part in location[1:])
    return ApiError(400, f"`{where}`: {error['msg']}", param=str(location[0]))
