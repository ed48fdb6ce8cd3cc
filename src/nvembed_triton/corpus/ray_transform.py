"""The bulk embedder's step as a Ray Data transform, for corpora that outgrow one machine: Ray reads,
schedules, retries failed tasks and writes; each Ray actor holds a client to the fleet of servers.

    import ray
    from nvembed_triton.corpus.ray_transform import EmbedBatches

    ds = ray.data.read_parquet("s3://bucket/corpus/")
    ds = ds.map_batches(
        EmbedBatches,
        fn_constructor_kwargs={"url": "10.0.0.1:8001,10.0.0.2:8001", "text_field": "text", "id_field": "id"},
        batch_size=1024, batch_format="pyarrow", concurrency=4,
    )
    ds.write_parquet("s3://bucket/embeddings/")

Each output row has id, embedding (a list of float32; null if refused), tokens, truncated, and reason and message (null
unless refused): `ds.filter(expr="reason IS NULL")` keeps the vectors. Ray itself re-runs a task
whose actor dies; it does not resume a finished job's partial output (the CLI does, per shard).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pyarrow as pa

from nvembed_triton.client.embedding_client import DEFAULT_MAX_RETRIES
from nvembed_triton.corpus.embedder import DEFAULT_BATCH_SIZE, embed_texts, fleet_client
from nvembed_triton.corpus.files import vector_list
from nvembed_triton.protocol import contract
from nvembed_triton.protocol.options import RequestOptions


class EmbedBatches:
    """A callable class for Dataset.map_batches(batch_format="pyarrow"). One event loop and one gRPC
    client per actor, kept between batches, so connections and round-robin state persist."""

    def __init__(
        self,
        url: str,
        text_field: str,
        id_field: str,
        dtype: str = "float32",
        batch_size: int = DEFAULT_BATCH_SIZE,
        concurrency: int | None = None,
        model: str = contract.PUBLIC_MODEL,
        inference_key: str | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        **options: str,
    ):
        urls = [u.strip() for u in url.split(",") if u.strip()]
        self.text_field, self.id_field = text_field, id_field
        self.options, self.dtype = RequestOptions.from_client(**options), dtype
        self.batch_size = batch_size
        self.loop = asyncio.new_event_loop()
        self.client = fleet_client(urls, model, concurrency, inference_key, max_retries)

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column(self.text_field).to_pylist()
        result = self.loop.run_until_complete(embed_texts(self.client, texts, self.options, self.batch_size))
        rows = len(texts)
        refused = np.ones(rows, bool)
        refused[result.embedded] = False
        tokens, truncated = np.zeros(rows, np.int32), np.zeros(rows, bool)
        tokens[result.embedded], truncated[result.embedded] = result.tokens, result.truncated
        reasons: list[str | None] = [None] * rows
        messages: list[str | None] = [None] * rows
        for position, reason, message in zip(result.rejected, result.reasons, result.messages, strict=True):
            reasons[position], messages[position] = reason, message
        return pa.table(
            {
                "id": batch.column(self.id_field),
                "embedding": vector_list(result.vectors, self.dtype, ~refused),
                "tokens": pa.array(tokens, pa.int32(), mask=refused),
                "truncated": pa.array(truncated, pa.bool_(), mask=refused),
                "reason": pa.array(reasons, pa.string()),
                "message": pa.array(messages, pa.string()),
            }
        )

    def __del__(self) -> None:
        loop = getattr(self, "loop", None)
        if loop is not None and not loop.is_closed():
            loop.run_until_complete(self.client.close())
            loop.close()
