"""LangChain adapter: `NVEmbedTritonEmbeddings` is a `langchain_core.embeddings.Embeddings` backed by
the package's gRPC clients. Without LangChain, the plain clients already have `embed_query` and
`embed_documents` (and the asyncio client `aembed_query` / `aembed_documents`)."""

from __future__ import annotations

from typing import Any

try:
    from langchain_core.embeddings import Embeddings
except ImportError as error:  # the plain clients never import this module
    raise ImportError(
        "nvembed_triton.client.langchain needs LangChain: pip install langchain-core "
        "(or pip install 'nvembed-triton[langchain]')"
    ) from error

from nvembed_triton.client.embedding_client import AsyncEmbeddingClient, EmbeddingClient
from nvembed_triton.protocol import contract


class NVEmbedTritonEmbeddings(Embeddings):
    """NV-Embed-v2 embeddings from the Triton server for LangChain. Queries get the model's query
    instruction, documents none; vectors are unit length. `client_options` (timeout_s,
    max_retries, max_concurrency) go to both the blocking and the asyncio client."""

    def __init__(
        self, url: str = "localhost:8001", model: str = contract.PUBLIC_MODEL, *, batch_size: int = 32, **client_options: Any
    ):
        self.batch_size = batch_size
        self.client = EmbeddingClient(url, model, **client_options)
        self.async_client = AsyncEmbeddingClient(url, model, **client_options)  # connects on first await

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.client.embed_documents(texts, batch_size=self.batch_size)

    def embed_query(self, text: str) -> list[float]:
        return self.client.embed_query(text)

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        return await self.async_client.embed_documents(texts, batch_size=self.batch_size)

    async def aembed_query(self, text: str) -> list[float]:
        return await self.async_client.embed_query(text)

    def close(self) -> None:
        """Closes the blocking client; `aclose` closes both."""
        self.client.close()

    async def aclose(self) -> None:
        await self.async_client.close()
        self.client.close()
