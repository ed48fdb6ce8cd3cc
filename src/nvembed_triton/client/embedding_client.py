"""Python clients for the embedding server: sentence-transformers' `encode` and LangChain's
`embed_query`/`embed_documents`, over gRPC, sync and asyncio. Inputs are split into requests within
the server's `max_documents`, sent concurrently, and put back in input order.

Importing this module is cheap: torch is imported only when tensors are asked for."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aio_grpcclient
from tqdm.auto import tqdm
from tritonclient.utils import InferenceServerException

from nvembed_triton.protocol import contract
from nvembed_triton.protocol.errors import EmbeddingError, InvalidInputError, ServerUnavailableError, UnauthorizedError
from nvembed_triton.protocol.options import RequestOptions
from nvembed_triton.protocol.reasons import Reason, reason_of
from nvembed_triton.settings import BY_KEY

if TYPE_CHECKING:
    import torch

# A request of batch_size long documents on a busy server can take minutes; a deadline only
# guards against a hung server. None waits forever.
DEFAULT_TIMEOUT_S = 300.0
MAX_GRPC_MESSAGE_BYTES = 2**31 - 1  # tritonclient's default; the server sets the real limits
RETRY_BASE_DELAY_S = 0.1  # doubled after each failed attempt, up to RETRY_MAX_DELAY_S
RETRY_MAX_DELAY_S = 2.0
# 30 retries wait about 50 s: long enough for serve.sh to restart a broken tritonserver.
DEFAULT_MAX_RETRIES = 30
# Retrying is silent at first (a restart or a full queue passes quickly); once attempts have failed
# for this long, a warning says what is happening, so a wrong address is not a minute of silence.
WARN_AFTER_S = 1.0
HTTP1_SERVER = "http1.x server"  # gRPC's words for a server that answered HTTP/1.1
logger = logging.getLogger(__name__)

T = TypeVar("T")
Texts: TypeAlias = str | Sequence[str] | np.ndarray
# As sentence-transformers: an array by default, a tensor (convert_to_tensor), or a list of tensors.
EncodeOutput: TypeAlias = "np.ndarray | torch.Tensor | list[torch.Tensor]"


@dataclass(frozen=True)
class _Request:
    """One inference request: `texts` (UTF-8) start at position `start` of the caller's input."""

    input_name: str
    start: int
    texts: list[bytes]
    parameters: dict[str, str]  # the per-request options (instruction, truncate, prompt_name)

    def inputs(self) -> list[grpcclient.InferInput]:
        shape = [1] if self.input_name == contract.QUERY_INPUT else [1, len(self.texts)]
        tensor = grpcclient.InferInput(self.input_name, shape, "BYTES")
        tensor.set_data_from_numpy(np.array(self.texts, dtype=object).reshape(shape))
        return [tensor]

    def describe(self) -> str:
        if self.input_name == contract.QUERY_INPUT:
            return f"the request for text {self.start} of the input"
        return f"the request for texts {self.start}..{self.start + len(self.texts) - 1} of the input"


@dataclass(frozen=True)
class EmbeddingsWithUsage:
    """Embeddings with the server's usage: per text, the tokens it was embedded with (special and
    instruction tokens included) and whether it was cut to the server's max_length."""

    embeddings: np.ndarray  # [n, D] float32, unit rows
    token_counts: np.ndarray  # [n] int32
    truncated: np.ndarray  # [n] bool

    @property
    def total_tokens(self) -> int:
        return int(self.token_counts.sum())


@dataclass(frozen=True)
class _Rows:
    embeddings: np.ndarray
    token_counts: np.ndarray
    truncated: np.ndarray


OUTPUTS = (contract.EMBEDDINGS_OUTPUT, contract.TOKEN_COUNTS_OUTPUT, contract.TRUNCATED_OUTPUT)


def _check_arguments(sentences: Texts, batch_size: int) -> tuple[list[str], bool]:
    """The texts as a list, and whether the caller passed a single string (sentence-transformers'
    rule: a str is one input, any sequence or array of str is a batch)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    single = isinstance(sentences, str)
    texts = [sentences] if single else list(sentences)
    for position, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{position}] is of type {type(text).__name__}; every text must be a str")
    return texts, single


def _plan_requests(texts: list[str], chunk_size: int, max_bytes: int | None, options: RequestOptions) -> list[_Request]:
    """Texts in `documents` chunks of at most `chunk_size` texts and `max_bytes` bytes of text (the
    server's max_request_bytes); a list of queries too, with the prompt_name option. One query
    alone goes as the contract's `query` input."""
    encoded = [_utf8(text, position) for position, text in enumerate(texts)]
    for position, text in enumerate(encoded):
        if max_bytes and len(text) > max_bytes:
            raise InvalidInputError(f"texts[{position}] is {len(text)} bytes; the server takes at most {max_bytes} per request")
    parameters = options.parameters()
    if options.prompt_name == contract.QUERY_PROMPT and len(encoded) == 1:
        return [_Request(contract.QUERY_INPUT, 0, encoded, parameters)]
    requests, start, size = [], 0, 0
    for position, text in enumerate(encoded):
        if position > start and (position - start == chunk_size or (max_bytes and size + len(text) > max_bytes)):
            requests.append(_Request(contract.DOCUMENTS_INPUT, start, encoded[start:position], parameters))
            start, size = position, 0
        size += len(text)
    if encoded:
        requests.append(_Request(contract.DOCUMENTS_INPUT, start, encoded[start:], parameters))
    return requests


def _utf8(text: str, position: int) -> bytes:
    # Encoded here, before anything is sent, so that a bad text (a lone surrogate) fails the whole
    # call up front and is named by its position in the input.
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidInputError(f"texts[{position}] cannot be encoded as UTF-8 ({error.reason} at {error.start})") from None


def _limit(config: dict[str, Any], name: str) -> int:
    """One of the model's per-request limits: its config.pbtxt parameter, else the declared default."""
    parameters = config.get("config", config).get("parameters", {})
    value = parameters.get(name, {}).get("string_value", "")
    return int(value) if value.isdigit() and int(value) > 0 else int(BY_KEY[name].default)


def _rows(result: grpcclient.InferResult, request: _Request) -> _Rows:
    embeddings = result.as_numpy(contract.EMBEDDINGS_OUTPUT)
    # Order is kept by position, so a response of the wrong size must not be stitched in.
    if embeddings is None or embeddings.ndim != 2 or embeddings.shape[0] != len(request.texts):
        shape = None if embeddings is None else list(embeddings.shape)
        raise EmbeddingError(f"the server answered {request.describe()} with {contract.EMBEDDINGS_OUTPUT} of shape {shape}")
    counts, truncated = result.as_numpy(contract.TOKEN_COUNTS_OUTPUT), result.as_numpy(contract.TRUNCATED_OUTPUT)
    if counts is None or truncated is None:  # a server without usage outputs
        counts, truncated = np.full(len(request.texts), -1, dtype=np.int32), np.zeros(len(request.texts), dtype=bool)
    return _Rows(embeddings, counts.reshape(-1), truncated.reshape(-1))


def _with_usage(rows: list[_Rows]) -> EmbeddingsWithUsage:
    if not rows:
        return EmbeddingsWithUsage(np.empty((0, 0), np.float32), np.empty(0, np.int32), np.empty(0, bool))
    fields = ("embeddings", "token_counts", "truncated")
    return EmbeddingsWithUsage(*(np.concatenate([getattr(r, field) for r in rows]) for field in fields))


def _assemble(
    chunks: list[np.ndarray], single: bool, convert_to_numpy: bool, convert_to_tensor: bool, normalize: bool
) -> EncodeOutput:
    """sentence-transformers' output: an array or tensor of shape [n, D] (D for a single str,
    (0,) for no texts), or a list of 1-D tensors when neither conversion is asked for."""
    embeddings = np.concatenate(chunks) if chunks else np.empty(0, dtype=np.float32)
    if normalize and embeddings.size:
        embeddings = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    if convert_to_tensor or not convert_to_numpy:
        import torch  # only here: the numpy path must not pay for importing torch

        tensor = torch.from_numpy(embeddings)
        output = tensor if convert_to_tensor else list(tensor)
    else:
        output = embeddings
    return output[0] if single else output


def _document_list(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("embed_documents takes a list of texts; use embed_query for one text")
    return list(texts)


def _channel_args() -> list[tuple[str, Any]]:
    """tritonclient's own channel defaults plus gRPC's round-robin balancing. With a target of
    several addresses ("ipv4:10.0.0.1:8001,10.0.0.2:8001") or a headless Kubernetes Service
    ("dns:///nvembed-triton-headless:8001"), gRPC spreads requests over every replica, not one
    connection's worth, and stops sending to a replica that goes away."""
    keepalive = grpcclient.KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.lb_policy_name", "round_robin"),
    ]


def _status(error: InferenceServerException) -> str | None:
    """The gRPC status name ("UNAVAILABLE"); tritonclient spells it "StatusCode.UNAVAILABLE"."""
    return (error.status() or "").removeprefix("StatusCode.") or None


def _reason(error: InferenceServerException) -> Reason:
    return reason_of(error.message() or str(error), _status(error))


def _backoff_s(failures: int) -> float:
    return min(RETRY_BASE_DELAY_S * 2 ** (failures - 1), RETRY_MAX_DELAY_S)


class AsyncEmbeddingClient:
    """asyncio client. At most `max_concurrency` requests are in flight, across all calls from one
    event loop. EmbeddingClient is the same client, blocking."""

    def __init__(
        self,
        url: str = "localhost:8001",
        model: str = contract.PUBLIC_MODEL,
        *,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
        max_concurrency: int = 8,
        inference_key: str | None = None,
    ):
        """inference_key: the key of a server that requires one on inference (its inference_key setting)."""
        if max_retries < 0 or max_concurrency < 1:
            raise ValueError(f"need max_retries >= 0 and max_concurrency >= 1, got {max_retries} and {max_concurrency}")
        self.url, self.model = url, model
        self.timeout_s, self.max_retries, self.max_concurrency = timeout_s, max_retries, max_concurrency
        self._headers = {contract.INFERENCE_KEY_HEADER: inference_key} if inference_key else None
        self._warned = False  # one warning per outage, however many requests retry through it
        self._max_documents: int | None = None  # the server's limits, read on first use
        self._max_request_bytes: int | None = None
        # A grpc.aio channel only works in the event loop that opened it, so it is opened on first
        # use, and again under a new loop (each asyncio.run has its own); the client can be made anywhere.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: aio_grpcclient.InferenceServerClient | None = None

    def _grpc(self) -> aio_grpcclient.InferenceServerClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._loop, self._client = loop, aio_grpcclient.InferenceServerClient(self.url, channel_args=_channel_args())
            self._slots = asyncio.Semaphore(self.max_concurrency)
        return self._client

    async def encode(
        self,
        sentences: Texts,
        batch_size: int = 32,
        show_progress_bar: bool = False,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        normalize_embeddings: bool = True,
        prompt_name: str | None = None,
        **options: str | None,
    ) -> EncodeOutput:
        """Embed a str (-> one vector) or a list of str (-> [n, D]; [] -> shape (0,)), in input order,
        as sentence-transformers does: a numpy array, one torch tensor with convert_to_tensor, a list
        of tensors with convert_to_numpy=False. prompt_name "query" adds the server's query
        instruction; None and "document" embed the texts as documents. The server's embeddings are
        already unit length: normalize_embeddings=False returns them as they are, True renormalises.
        `options` are the per-request options (protocol/options.py, docs/clients.md): prompt, this
        call's own instruction (as sentence-transformers' `prompt`); truncate: END (default), START or
        NONE for texts over the server's max_length."""
        rows, single = await self._embed(sentences, batch_size, show_progress_bar, prompt_name=prompt_name, **options)
        return _assemble([r.embeddings for r in rows], single, convert_to_numpy, convert_to_tensor, normalize_embeddings)

    async def embed_with_usage(self, texts: Sequence[str], *, batch_size: int = 32, **options: str | None) -> EmbeddingsWithUsage:
        """encode's embeddings ([n, D] numpy) with the server's token counts and truncation flags;
        the same options (prompt_name among them)."""
        return _with_usage((await self._embed(_document_list(texts), batch_size, False, **options))[0])

    async def encode_query(self, sentences: Texts, **kwargs: Any) -> EncodeOutput:
        """sentence-transformers' encode_query: encode with the query prompt."""
        return await self.encode(sentences, prompt_name=contract.QUERY_PROMPT, **kwargs)

    async def encode_document(self, sentences: Texts, **kwargs: Any) -> EncodeOutput:
        """sentence-transformers' encode_document: encode as documents."""
        return await self.encode(sentences, prompt_name=contract.DOCUMENT_PROMPT, **kwargs)

    async def embed_query(self, text: str) -> list[float]:
        """LangChain's query embedding: one vector, with the query instruction."""
        return (await self.encode(text, prompt_name=contract.QUERY_PROMPT)).tolist()

    async def embed_documents(self, texts: Sequence[str], *, batch_size: int = 32) -> list[list[float]]:
        """LangChain's document embeddings: one vector per text, in order."""
        return (await self.encode(_document_list(texts), batch_size, prompt_name=contract.DOCUMENT_PROMPT)).tolist()

    # LangChain's names for the same coroutines.
    aembed_query = embed_query
    aembed_documents = embed_documents

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def __aenter__(self) -> AsyncEmbeddingClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _embed(self, sentences, batch_size, show_progress_bar, **options) -> tuple[list[_Rows], bool]:
        record = RequestOptions.from_client(**{keyword: value for keyword, value in options.items() if value is not None})
        texts, single = _check_arguments(sentences, batch_size)
        if texts and self._max_documents is None:
            config = await self._call("reading the model config", self._read_config)
            self._max_documents, self._max_request_bytes = _limit(config, "max_documents"), _limit(config, "max_request_bytes")
        chunk_size = min(batch_size, self._max_documents or batch_size)
        requests = _plan_requests(texts, chunk_size, self._max_request_bytes, record)
        with tqdm(total=len(texts), unit="text", disable=not show_progress_bar) as progress:
            return await self._run(requests, progress), single

    async def _read_config(self) -> dict[str, Any]:
        return await self._grpc().get_model_config(self.model, as_json=True, client_timeout=self.timeout_s, headers=self._headers)

    async def _run(self, requests: list[_Request], progress: tqdm) -> list[_Rows]:
        async def send(request: _Request) -> _Rows:
            async with self._slots:
                rows = await self._infer(request)
            progress.update(len(request.texts))
            return rows

        self._grpc()  # opens the channel and its slots in this loop before the requests wait on them
        tasks = [asyncio.ensure_future(send(request)) for request in requests]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()  # the first failure ends the call; requests not yet sent are dropped
            raise

    async def _infer(self, request: _Request) -> _Rows:
        outputs = [grpcclient.InferRequestedOutput(name) for name in OUTPUTS]
        result = await self._call(
            request.describe(),
            lambda: self._grpc().infer(
                self.model, request.inputs(), outputs=outputs, client_timeout=self.timeout_s, parameters=request.parameters,
                headers=self._headers,
            ),
        )
        return _rows(result, request)

    async def _call(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        failures, first_failure = 0, 0.0
        while True:
            try:
                result = await call()
                self._warned = False
                return result
            except InferenceServerException as error:
                failures += 1
                self._retry_or_raise(error, what, failures)
                first_failure = first_failure or time.monotonic()
                if not self._warned and time.monotonic() - first_failure >= WARN_AFTER_S:
                    self._warned = True
                    left_s = sum(_backoff_s(n) for n in range(failures, self.max_retries + 1))
                    logger.warning(
                        "model %r at %s is unavailable (%s: %s); retrying %s for up to about %.0f s more (max_retries %d)",
                        self.model, self.url, _status(error), error.message() or error, what, left_s, self.max_retries,
                    )  # fmt: skip
            await asyncio.sleep(_backoff_s(failures))

    def _retry_or_raise(self, error: InferenceServerException, what: str, failures: int) -> None:
        """Returns if `error` may be retried once more, else raises the matching EmbeddingError."""
        reason = _reason(error)
        status = _status(error)
        message, where = error.message() or str(error), f"model {self.model!r} at {self.url}, {what}"
        if HTTP1_SERVER in message:  # no retry can help: the address is wrong
            raise ServerUnavailableError(
                f"{self.url} answers HTTP/1.1, not gRPC: is it Triton's HTTP port (8000 by default)? The client speaks "
                f"gRPC: give Triton's gRPC port (8001 by default) ({where})", status, "unavailable",
            ) from error  # fmt: skip
        if reason.retry and failures <= self.max_retries:
            return
        if reason.name == "unauthorized":
            hint = "pass inference_key=" if self._headers is None else "check the inference_key you pass"
            raise UnauthorizedError(f"the server refused the inference key: {message}; {hint} ({where})", status,
                                    reason.name) from error  # fmt: skip
        if reason.name == "invalid_input":
            raise InvalidInputError(f"{message} ({where})", status, reason.name) from error
        if reason.retry:
            tries = f"{failures} attempt" + "s" * (failures > 1)
            raise ServerUnavailableError(f"server unavailable after {tries}: {message} ({where})", status, reason.name) from error
        raise EmbeddingError(f"{status or 'error'}: {message} ({where})", status, reason.name) from error


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread, client: AsyncEmbeddingClient) -> None:
    """Closes the gRPC channel on its loop, then stops the loop and its thread (once)."""
    if loop.is_closed():
        return
    if thread.is_alive():
        asyncio.run_coroutine_threadsafe(client.close(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
    loop.close()


def _blocking(method: Callable[..., Awaitable[T]]) -> Callable[..., T]:
    """AsyncEmbeddingClient's coroutine method as a blocking one (same name, signature and docs)."""

    @functools.wraps(method)
    def call(self: EmbeddingClient, *args: Any, **kwargs: Any) -> T:
        return self._wait(method(self._async, *args, **kwargs))

    return call


class EmbeddingClient:
    """Blocking client, thread-safe: AsyncEmbeddingClient on an event loop of its own thread, so
    both clients behave alike. At most `max_concurrency` requests are in flight, across all calls.
    close() (or the with-block, or garbage collection) stops the thread. Make clients after a
    fork(), not before: the loop thread does not exist in a forked child."""

    def __init__(self, url: str = "localhost:8001", model: str = contract.PUBLIC_MODEL, **options: Any):
        self._async = AsyncEmbeddingClient(url, model, **options)
        self.url, self.model = url, model
        self.timeout_s, self.max_retries, self.max_concurrency = (
            self._async.timeout_s, self._async.max_retries, self._async.max_concurrency
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="nvembed-client", daemon=True)
        self._thread.start()
        self._closer = weakref.finalize(self, _stop_loop, self._loop, self._thread, self._async)

    def _wait(self, coroutine: Awaitable[T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt: the call's requests not yet sent are dropped
            raise

    encode = _blocking(AsyncEmbeddingClient.encode)
    embed_with_usage = _blocking(AsyncEmbeddingClient.embed_with_usage)
    encode_query = _blocking(AsyncEmbeddingClient.encode_query)
    encode_document = _blocking(AsyncEmbeddingClient.encode_document)
    embed_query = _blocking(AsyncEmbeddingClient.embed_query)
    embed_documents = _blocking(AsyncEmbeddingClient.embed_documents)

    def close(self) -> None:
        self._closer()

    def __enter__(self) -> EmbeddingClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
