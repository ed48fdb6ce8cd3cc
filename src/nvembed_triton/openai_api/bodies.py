"""The HTTP edge of the OpenAI-compatible front: errors as OpenAI-shaped responses, request bodies
read within a byte and a time limit, and connections closed when a body is refused unread."""

from __future__ import annotations

import asyncio

from fastapi import Request, Response
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nvembed_triton.openai_api.schemas import ApiError

RETRY_AFTER_S = "1"


def error_response(error: ApiError) -> Response:
    headers = {"Retry-After": RETRY_AFTER_S} if error.status in (429, 503) else {}
    return Response(error.body().model_dump_json(), error.status, {**headers, **error.headers}, media_type="application/json")


def too_large(size: str, max_bytes: int) -> ApiError:
    return ApiError(413, f"the request body is {size} bytes; at most {max_bytes} are accepted", code="body_too_large")


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytearray:
    """The body, counted as it arrives: 413 as soon as it declares or passes max_bytes, 408 unless all
    of it has arrived within timeout_s. What was not read is never read (CloseUnreadBodies)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large(declared, max_bytes)
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_bytes:
                    raise too_large("over " + str(max_bytes), max_bytes)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s", code="request_timeout") from None
    except ClientDisconnect:
        raise ApiError(400, "the client went away before sending the whole body", code="client_disconnected") from None
    return body


class CloseUnreadBodies:
    """ASGI middleware: a response given before the request body was read to its end (a refusal)
    says `Connection: close`, and the HTTP server closes the connection; otherwise it would go on reading,
    and discarding, the rest of the body however long it is."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        unread = [b"transfer-encoding" in headers or int(headers.get(b"content-length", b"0")) > 0]  # h11 checked it

        async def receiving() -> Message:
            message = await receive()
            if not message.get("more_body", False):
                unread[0] = False
            return message

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start" and unread[0]:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receiving, sending)
