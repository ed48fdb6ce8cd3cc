"""Calling the server over gRPC: EmbeddingClient and AsyncEmbeddingClient (embedding_client), the
LangChain adapter (langchain). The light install: no torch. Imports protocol and settings only."""

from nvembed_triton.client.embedding_client import AsyncEmbeddingClient, EmbeddingClient, EmbeddingsWithUsage

__all__ = ["AsyncEmbeddingClient", "EmbeddingClient", "EmbeddingsWithUsage"]
