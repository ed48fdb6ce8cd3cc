"""An OpenAI- and NIM-compatible embeddings API in front of the Triton models: POST /v1/embeddings,
GET /v1/models, GET /v1/health/ready (NIM) and GET /health. Each request goes to Triton over gRPC
through AsyncEmbeddingClient (split into requests the model accepts, sent concurrently, order
kept), so Triton's dynamic batching applies to HTTP and gRPC callers alike.

    python -m nvembed_triton.openai_api --triton-url 127.0.0.1:8001 --model nv-embed-v2 --port 8080

serve.sh starts it with --openai-port (NVEMBED_OPENAI_PORT)."""

from __future__ import annotations

import argparse
import base64
import json
from typing import Any

import numpy as np
import tritonclient.grpc.aio as aio_grpcclient
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from tritonclient.utils import InferenceServerException

from . import contract
from .client import AsyncEmbeddingClient, EmbeddingError, InvalidInputError, ServerUnavailableError

MAX_INPUTS = 2048  # OpenAI's own limit per request
# The body holds texts as JSON strings: escaping can double them, so twice the model's text limit.
BODY_BYTES_PER_TEXT_BYTE = 2
RETRY_AFTER_S = "1"
MAX_IN_FLIGHT = 1024  # requests to Triton at once, across HTTP callers: beyond Triton's own queue bounds
# NIM's input_type: query gets the model's query instruction; passage/document none.
INPUT_TYPES = {"query": contract.QUERY_PROMPT, "passage": contract.DOCUMENT_PROMPT, "document": contract.DOCUMENT_PROMPT}


class ApiError(Exception):
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 and self.status != 429 else "server_error"
        headers = {"Retry-After": RETRY_AFTER_S} if self.status in (429, 503) else None
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


def parse_input(value: Any) -> list[str]:
    """OpenAI's `input`: a string or a list of strings (token-id arrays are not supported)."""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list):
        raise ApiError(400, "`input` must be a string or a list of strings", "input")
    if not texts:
        raise ApiError(400, "`input` is an empty list; send at least one string", "input")
    if len(texts) > MAX_INPUTS:
        raise ApiError(400, f"`input` holds {len(texts)} items; at most {MAX_INPUTS} are allowed per request", "input")
    for position, text in enumerate(texts):
        if isinstance(text, int) or (isinstance(text, list) and all(isinstance(t, int) for t in text)):
            raise ApiError(400, "token-id arrays are not supported: send the text itself", "input")
        if not isinstance(text, str):
            raise ApiError(400, f"input[{position}] is not a string", "input")
        if not text:
            raise ApiError(400, f"input[{position}] is an empty string", "input")
    return texts


def as_api_error(error: EmbeddingError) -> ApiError:
    """The Python client's errors as HTTP statuses: the caller's input 400, a full queue 429, a
    server restarting or draining 503, anything else 500."""
    if isinstance(error, InvalidInputError):
        return ApiError(400, str(error), "input")
    if isinstance(error, ServerUnavailableError):
        status = 429 if "maximum queue size" in str(error) else 503
        return ApiError(status, f"the server is at capacity or restarting; retry: {error}", code="unavailable")
    return ApiError(500, str(error), code="internal_error")


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # little-endian float32, as OpenAI sends it
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector.tolist()


def create_app(triton_url: str, model: str) -> FastAPI:
    app = FastAPI(title="nvembed-triton OpenAI-compatible embeddings", docs_url=None, redoc_url=None)
    state: dict[str, Any] = {}

    async def client() -> AsyncEmbeddingClient:
        # One client for the app's event loop, shared by all HTTP requests: as many in flight as
        # Triton would queue, so a full queue shows as 429 rather than waiting here; one retry only,
        # so HTTP callers get 429/503 with Retry-After fast.
        if "client" not in state:
            state["client"] = AsyncEmbeddingClient(triton_url, model, max_retries=1, max_concurrency=MAX_IN_FLIGHT)
        return state["client"]

    async def limits() -> tuple[int, int]:
        """The model's dimension and the largest body accepted, read once from Triton."""
        if "limits" not in state:
            try:
                async with aio_grpcclient.InferenceServerClient(triton_url) as triton:
                    config = (await triton.get_model_config(model, as_json=True, client_timeout=10))["config"]
            except InferenceServerException as error:
                raise ServerUnavailableError(f"cannot read the model config: {error.message()}", "UNAVAILABLE") from None
            text_bytes = int(config.get("parameters", {}).get("max_request_bytes", {}).get("string_value") or 16 * 2**20)
            dimension = (await (await client()).encode(["dimension"])).shape[-1]
            state["limits"] = (dimension, text_bytes * BODY_BYTES_PER_TEXT_BYTE + 2**20)
        return state["limits"]

    async def triton_ready() -> bool:
        try:
            async with aio_grpcclient.InferenceServerClient(triton_url) as triton:
                return await triton.is_model_ready(model, client_timeout=5)
        except Exception:  # not reachable: not ready
            return False

    async def api_error_for(error: EmbeddingError) -> ApiError:
        # Readiness is asked only on this failure path: asking on every request costs a round trip.
        if isinstance(error, ServerUnavailableError) and not await triton_ready():
            return ApiError(503, "the embedding model is not ready; retry shortly", code="model_not_ready")
        return as_api_error(error)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, error: Exception) -> JSONResponse:
        """A fault of ours, still in OpenAI's shape (and logged by uvicorn)."""
        return ApiError(500, f"internal error: {error!r}", code="internal_error").response()

    @app.get("/health")
    async def health() -> JSONResponse:
        ready = await triton_ready()
        return JSONResponse({"status": "ok" if ready else "unavailable"}, status_code=200 if ready else 503)

    @app.get("/v1/health/ready")
    async def health_ready() -> JSONResponse:
        ready = await triton_ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "nvembed-triton"}]}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        try:
            dimension, max_body = await limits()
        except EmbeddingError as error:
            raise await api_error_for(error) from None
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body:
            raise ApiError(413, f"the request body is {declared} bytes; at most {max_body} are accepted", code="body_too_large")
        body = await request.body()
        if len(body) > max_body:
            raise ApiError(413, f"the request body is {len(body)} bytes; at most {max_body} are accepted", code="body_too_large")
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ApiError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from None
        if not isinstance(payload, dict):
            raise ApiError(400, "the request body must be a JSON object")
        if payload.get("model") != model:
            asked = payload.get("model")
            raise ApiError(404, f"The model `{asked}` does not exist; this server serves `{model}`", "model", "model_not_found")
        texts = parse_input(payload.get("input"))
        encoding_format = payload.get("encoding_format") or "float"
        if encoding_format not in ("float", "base64"):
            raise ApiError(400, "`encoding_format` must be 'float' or 'base64'", "encoding_format")
        if payload.get("dimensions") is not None and payload["dimensions"] != dimension:
            message = f"`dimensions` must be {dimension}, the model's only size (it cannot shorten its vectors)"
            raise ApiError(400, message, "dimensions")
        input_type = payload.get("input_type") or "passage"
        if input_type not in INPUT_TYPES:
            raise ApiError(400, f"`input_type` must be one of {', '.join(INPUT_TYPES)}", "input_type")
        truncate = payload.get("truncate") or contract.TRUNCATE_END
        if not isinstance(truncate, str) or truncate.upper() not in contract.TRUNCATIONS:
            raise ApiError(400, f"`truncate` must be one of {', '.join(contract.TRUNCATIONS)}", "truncate")
        try:
            result = await (await client()).embed_with_usage(texts, prompt_name=INPUT_TYPES[input_type], truncate=truncate)
        except EmbeddingError as error:
            raise await api_error_for(error) from None
        data = [
            {"object": "embedding", "index": i, "embedding": encode_vector(vector, encoding_format)}
            for i, vector in enumerate(result.embeddings)
        ]
        usage = {"prompt_tokens": result.total_tokens, "total_tokens": result.total_tokens}
        return JSONResponse({"object": "list", "data": data, "model": model, "usage": usage})

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--triton-url", default="127.0.0.1:8001")
    parser.add_argument("--model", default=contract.PUBLIC_MODEL)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    uvicorn.run(create_app(args.triton_url, args.model), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
