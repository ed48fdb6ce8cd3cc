"""An OpenAI- and NIM-compatible embeddings API in front of the Triton model: POST /v1/embeddings,
GET /v1/models, GET /v1/health/ready (NIM) and GET /health. Each request goes to Triton over gRPC
through AsyncEmbeddingClient (split into requests the model accepts, at most MAX_IN_FLIGHT at once
across HTTP callers, order kept), so the model batches HTTP and gRPC callers alike.

    NVEMBED_API_KEY=... python -m nvembed_triton.openai_api.app --triton-url 127.0.0.1:8001 --port 8080

serve.sh runs it in a process of its own with --openai-port (NVEMBED_OPENAI_PORT). With an API key
(NVEMBED_API_KEY, read from the environment so it never shows on a command line), every /v1
endpoint but the health check asks for `Authorization: Bearer <key>`."""

from __future__ import annotations

import argparse
import asyncio
import base64
import hmac
import signal
from typing import Any

import numpy as np
import tritonclient.grpc.aio as aio_grpcclient
from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from tritonclient.utils import InferenceServerException

from nvembed_triton.client.embedding_client import AsyncEmbeddingClient, EmbeddingError, ServerUnavailableError, _limit
from nvembed_triton.openai_api.bodies import CloseUnreadBodies, error_response, read_body
from nvembed_triton.openai_api.schemas import (
    ApiError,
    Embedding,
    EmbeddingResponse,
    ModelCard,
    ModelList,
    Usage,
    parse_embedding_request,
)
from nvembed_triton.protocol import contract
from nvembed_triton.protocol.contract import INFERENCE_KEY_HEADER
from nvembed_triton.protocol.lifecycle import supervisor_says_ready
from nvembed_triton.protocol.options import RequestOptions
from nvembed_triton.protocol.reasons import REASONS
from nvembed_triton.settings import launcher_setting

# The body holds texts as JSON strings: escaping can double them, so twice the model's text limit.
BODY_BYTES_PER_TEXT_BYTE = 2
BODY_TIMEOUT_S = 60.0  # for the whole body to arrive: 33 MiB at ~0.5 MiB/s
# Requests to Triton at once, across HTTP callers; the rest wait here. Well below the requests the
# model holds (max_held_requests, 384), so one large HTTP request cannot fill it: 2048 texts are 64 requests of 32.
MAX_IN_FLIGHT = 64
# Hypercorn closes a connection that is idle this long: one that has not sent a whole request's
# headers since it opened (so idle or trickling connections cannot pile up: uvicorn 0.55 times only
# the wait between requests, and refuses everyone once its connection limit is full), or since its
# last response. Longer than clients keep an idle one (httpx, under the openai SDK: 5 s), so a client
# never sends on a connection the server is closing at that moment.
IDLE_CONNECTION_S = 8
GRACEFUL_SHUTDOWN_S = 10  # on SIGTERM/SIGINT, requests in flight get this long


def body_limit(model_config: dict[str, Any]) -> int:
    """The largest body accepted, from the model's config (its max_request_bytes)."""
    return _limit(model_config, "max_request_bytes") * BODY_BYTES_PER_TEXT_BYTE + 2**20


# Each reason (reasons.REASONS) as an HTTP status: the caller's input 400, a full queue 429, a server
# restarting or draining 503, a client gone 499; Triton refusing this API's own inference key is a
# fault of the deployment (500), not of the caller.
HTTP_STATUS = {"invalid_input": 400, "over_capacity": 429, "shutting_down": 503, "unavailable": 503, "cancelled": 499,
               "unauthorized": 500, "internal": 500}  # fmt: skip


def as_api_error(error: EmbeddingError) -> ApiError:
    """The Python client's errors as OpenAI-shaped HTTP errors, by their reason."""
    reason = REASONS.get(error.reason or "internal", REASONS["internal"])
    status = HTTP_STATUS[reason.name]
    if reason.name == "invalid_input":
        return ApiError(status, str(error), "input")
    if reason.retry:
        return ApiError(status, f"the server is at capacity or restarting; retry: {error}", code="unavailable")
    return ApiError(status, str(error), code="internal_error")


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # little-endian float32, as OpenAI sends it
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector.tolist()


def key_check(api_key: str):
    """A dependency that refuses requests without `Authorization: Bearer <api_key>` (401)."""
    expected = api_key.encode()

    async def check(request: Request) -> None:
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if not (scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), expected)):
            raise ApiError(401, "a valid API key is required: send `Authorization: Bearer <key>`", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    return check


def create_app(
    triton_url: str, model: str, *, api_key: str = "", body_timeout_s: float = BODY_TIMEOUT_S, inference_key: str = ""
) -> FastAPI:
    """inference_key: Triton's, when serve.sh's inference_key setting requires one."""
    # No documentation pages (nothing is fetched from a CDN at run time); the schema below, behind the key.
    app = FastAPI(title="nvembed-triton OpenAI-compatible embeddings", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(CloseUnreadBodies)
    guarded = [Depends(key_check(api_key))] if api_key else []
    state: dict[str, Any] = {}

    async def client() -> AsyncEmbeddingClient:
        # One client for the app's event loop, shared by all HTTP requests; one retry only, so HTTP
        # callers get 429/503 with Retry-After fast.
        if "client" not in state:
            state["client"] = AsyncEmbeddingClient(
                triton_url, model, max_retries=1, max_concurrency=MAX_IN_FLIGHT, inference_key=inference_key or None
            )
        return state["client"]

    async def limits() -> tuple[int, int]:
        """The model's dimension and the largest body accepted, read once from Triton."""
        if "limits" not in state:
            try:
                async with aio_grpcclient.InferenceServerClient(triton_url) as triton:
                    headers = {INFERENCE_KEY_HEADER: inference_key} if inference_key else None
                    config = await triton.get_model_config(model, as_json=True, client_timeout=10, headers=headers)
            except InferenceServerException as error:
                raise ServerUnavailableError(f"cannot read the model config: {error.message()}", "UNAVAILABLE") from None
            dimension = (await (await client()).encode(["dimension"])).shape[-1]
            state["limits"] = (dimension, body_limit(config))
        return state["limits"]

    async def triton_ready() -> bool:
        """Triton says the model is ready, and serve.sh's supervisor does not say it is stuck."""
        if not supervisor_says_ready():
            return False
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
    async def api_error(_request: Request, error: ApiError) -> Response:
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> Response:
        """Starlette's own refusals (404 unknown path, 405 wrong method) in OpenAI's shape."""
        message = f"{error.detail}: {request.method} {request.url.path}"
        return error_response(ApiError(error.status_code, message, headers=error.headers))

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, error: Exception) -> Response:
        """A fault of ours, still in OpenAI's shape (and logged by the HTTP server)."""
        return error_response(ApiError(500, f"internal error: {error!r}", code="internal_error"))

    @app.get("/health")
    async def health() -> JSONResponse:
        ready = await triton_ready()
        return JSONResponse({"status": "ok" if ready else "unavailable"}, status_code=200 if ready else 503)

    @app.get("/v1/health/ready")
    async def health_ready() -> JSONResponse:
        ready = await triton_ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/openapi.json", dependencies=guarded, include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/v1/models", dependencies=guarded, response_model=ModelList)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model)])

    @app.post("/v1/embeddings", dependencies=guarded, response_model=EmbeddingResponse)
    async def embeddings(request: Request) -> Response:
        try:
            dimension, max_body = await limits()
        except EmbeddingError as error:
            raise await api_error_for(error) from None
        asked = parse_embedding_request(await read_body(request, max_body, body_timeout_s))
        if asked.model != model:
            message = f"The model `{asked.model[:200]}` does not exist; this server serves `{model}`"
            raise ApiError(404, message, "model", "model_not_found")
        if asked.dimensions is not None and asked.dimensions != dimension:
            message = f"`dimensions` must be {dimension}, the model's only size (it cannot shorten its vectors)"
            raise ApiError(400, message, "dimensions")
        try:
            options = RequestOptions.from_openai(asked.model_dump())
            result = await (await client()).embed_with_usage(asked.input, **options.client_keywords())
        except EmbeddingError as error:
            raise await api_error_for(error) from None
        # Built without validation (the values are ours) and serialised by pydantic's Rust
        # serializer, several times faster than json.dumps on 4096-float vectors.
        data = [
            Embedding.model_construct(index=i, embedding=encode_vector(vector, asked.encoding_format))
            for i, vector in enumerate(result.embeddings)
        ]
        usage = Usage(prompt_tokens=result.total_tokens, total_tokens=result.total_tokens)
        answer = EmbeddingResponse.model_construct(data=data, model=model, usage=usage)
        return Response(answer.model_dump_json(), media_type="application/json")

    return app


def main() -> None:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--triton-url", default="127.0.0.1:8001")
    parser.add_argument("--model", default=contract.PUBLIC_MODEL)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--body-timeout-s", type=float, default=BODY_TIMEOUT_S, help="for a request body to arrive (408 after)")
    args = parser.parse_args()
    # Both keys come from the environment serve.sh passes on: never on a command line.
    api_key, inference_key = launcher_setting("api_key"), launcher_setting("inference_key")
    app = create_app(
        args.triton_url, args.model, api_key=api_key, body_timeout_s=args.body_timeout_s, inference_key=inference_key
    )
    config = Config()
    config.bind = [f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}"]
    config.keep_alive_timeout = IDLE_CONNECTION_S
    config.graceful_timeout = GRACEFUL_SHUTDOWN_S
    config.accesslog, config.errorlog = None, "-"
    asyncio.run(serve_until_signalled(serve, app, config))


async def serve_until_signalled(serve, app, config) -> None:
    """Serves until SIGTERM or SIGINT, then lets requests in flight finish (graceful_timeout): exit 0."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await serve(app, config, shutdown_trigger=stop.wait)


if __name__ == "__main__":
    main()
