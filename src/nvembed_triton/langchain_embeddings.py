"""LangChain adapter: `NVEmbedTritonEmbeddings` is a `langchain_core.embeddings.Embeddings`.
Without LangChain, the plain clients already have `embed_query` / `embed_documents`."""

from __future__ import annotations

from collections.abc import Sequence

try:
    from langchain_core.embeddings import Embeddings
except ImportError as error:  # pragma: no cover - exercised only without langchain-core
    raise ImportError("NVEmbedTritonEmbeddings needs LangChain: pip install langchain-core") from error

from . import contract
from .client import AsyncEmbeddingClient, EmbeddingClient


class NVEmbedTritonEmbeddings(Embeddings):
    def __init__(self, url: str = "localhost:8001", model: str = contract.PUBLIC_MODEL, **client_options):
        self.url, self.model, self._options = url, model, client_options
        self._client = EmbeddingClient(url, model, **client_options)
        self._async_client: AsyncEmbeddingClient | None = None  # made in the caller's event loop

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self._client.embed_documents(texts)

    def embed_query(self, text: str) -> list[float]:
        return self._client.embed_query(text)

    async def aembed_documents(self, texts: Sequence[str]) -> list[list[float]]:
        return await self._async().embed_documents(texts)

    async def aembed_query(self, text: str) -> list[float]:
        return await self._async().embed_query(text)

    def _async(self) -> AsyncEmbeddingClient:
        if self._async_client is None:
            self._async_client = AsyncEmbeddingClient(self.url, self.model, **self._options)
        return self._async_client
