"""One corpus run: its job and manifest, the shards embedded through one client for all the servers
(round-robin), refusals found text by text. The command is corpus/cli.py."""


from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from nvembed_triton.client.embedding_client import DEFAULT_MAX_RETRIES, AsyncEmbeddingClient
from nvembed_triton.corpus.files import (  # pyarrow comes in there, with an install hint if missing
    MANIFEST,
    CorpusError,
    EmbeddedTexts,
    Shard,
    check_ids,
    input_format,
    remove_partials,
    shard_name,
    shards,
    write_json_atomically,
    write_shard,
)
from nvembed_triton.protocol import contract
from nvembed_triton.protocol.errors import InvalidInputError
from nvembed_triton.protocol.options import RequestOptions, declared
from nvembed_triton.protocol.reasons import reason_of

DEFAULT_SHARD_ROWS = 4096
DEFAULT_BATCH_SIZE = 32  # texts per request: the server's dynamic batching packs many into one pass
REQUESTS_PER_SERVER = 16  # in flight per server: enough queued work to keep its passes full
SHARDS_IN_FLIGHT = 2  # the next shard's requests start while the last one's finish and are written
EMPTY_REASON = "empty"  # a null or empty text: the server refuses it, so it is never sent
DTYPES = ("float32", "float16")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CorpusJob:
    input: Path
    output_dir: Path
    urls: tuple[str, ...]
    text_field: str
    id_field: str
    options: RequestOptions = field(default_factory=RequestOptions)  # a resumed run must use the same
    dtype: str = "float32"  # of the stored vectors
    shard_rows: int = DEFAULT_SHARD_ROWS
    batch_size: int = DEFAULT_BATCH_SIZE
    concurrency: int | None = None  # requests in flight; None: REQUESTS_PER_SERVER per server
    model: str = contract.PUBLIC_MODEL
    inference_key: str | None = None
    max_retries: int = DEFAULT_MAX_RETRIES

    def fingerprint(self) -> dict:
        """Everything that decides what the output holds, and the input file as it is now."""
        stat = self.input.stat()
        return {
            "input": str(self.input.resolve()),
            "input_bytes": stat.st_size,
            "input_modified_ns": stat.st_mtime_ns,
            "text_field": self.text_field,
            "id_field": self.id_field,
            "shard_rows": self.shard_rows,
            "model": self.model,
            **{name: getattr(self.options, name) for name in declared()},
            "dtype": self.dtype,
        }


def grpc_target(urls: tuple[str, ...] | list[str]) -> str:
    """One gRPC target for the client. Several HOST:PORT become "ipv4:IP:PORT,..." (names resolved
    now), which gRPC balances round-robin and stops using for a server that goes away."""
    if len(urls) == 1:
        return urls[0]
    addresses = []
    for url in urls:
        host, _, port = url.rpartition(":")
        if not host or not port.isdigit():
            raise CorpusError(f"--url wants HOST:PORT, got {url!r}")
        try:
            addresses.append(f"{socket.getaddrinfo(host, int(port), socket.AF_INET)[0][4][0]}:{port}")
        except socket.gaierror as error:
            raise CorpusError(f"cannot resolve {host!r}: {error}") from None
    return "ipv4:" + ",".join(addresses)


def fleet_client(
    urls: tuple[str, ...] | list[str], model: str, concurrency: int | None, inference_key: str | None, max_retries: int
) -> AsyncEmbeddingClient:
    """One client for all the servers: round-robin over them, REQUESTS_PER_SERVER each in flight
    unless `concurrency` says otherwise."""
    return AsyncEmbeddingClient(
        grpc_target(urls), model, max_concurrency=concurrency or REQUESTS_PER_SERVER * len(urls),
        inference_key=inference_key, max_retries=max_retries,
    )  # fmt: skip


class _Embedded(NamedTuple):
    position: int
    vector: np.ndarray
    tokens: int
    truncated: bool


class _Refused(NamedTuple):
    position: int
    reason: str
    message: str


async def embed_texts(
    client: AsyncEmbeddingClient, texts: list[str | None], options: RequestOptions, batch_size: int,
    problems: dict[int, tuple[str, str]] | None = None,
) -> EmbeddedTexts:  # fmt: skip
    """Every text embedded (as a document unless the options' prompt_name says otherwise), or refused
    with its reason: a request the server refuses as invalid is resent text by text to find which;
    rows that could not be read (`problems`) and empty texts are never sent. Errors that are not
    about a text (a server down past the client's retries, an internal fault) are raised: the run
    stops, and resumes."""
    problems = problems or {}
    keywords = {"prompt_name": contract.DOCUMENT_PROMPT, **options.client_keywords()}

    async def one_request(positions: list[int]) -> list[_Embedded | _Refused]:
        try:
            result = await client.embed_with_usage([texts[i] for i in positions], batch_size=len(positions), **keywords)
        except InvalidInputError as error:
            if len(positions) > 1:
                return [row for single in await asyncio.gather(*(one_request([i]) for i in positions)) for row in single]
            return [_Refused(positions[0], error.reason or reason_of(str(error)).name, str(error))]
        rows = zip(positions, result.embeddings, result.token_counts, result.truncated, strict=True)
        return [_Embedded(i, vector, int(count), bool(cut)) for i, vector, count, cut in rows]

    wanted = [i for i, text in enumerate(texts) if text and i not in problems]
    requests = [wanted[start : start + batch_size] for start in range(0, len(wanted), batch_size)]
    rows = [row for answer in await asyncio.gather(*(one_request(r) for r in requests)) for row in answer]
    done = sorted((row for row in rows if isinstance(row, _Embedded)), key=lambda row: row.position)
    refused = [_Refused(i, *problems[i]) if i in problems else _Refused(i, EMPTY_REASON, "the text is empty or missing")
               for i, text in enumerate(texts) if not text or i in problems]  # fmt: skip
    refused = sorted(refused + [row for row in rows if isinstance(row, _Refused)], key=lambda row: row.position)
    return EmbeddedTexts(
        embedded=[row.position for row in done],
        vectors=np.stack([row.vector for row in done]) if done else np.zeros((0, 0), np.float32),
        tokens=np.array([row.tokens for row in done], np.int32),
        truncated=np.array([row.truncated for row in done], bool),
        rejected=[row.position for row in refused],
        reasons=[row.reason for row in refused],
        messages=[row.message for row in refused],
    )


@dataclass
class RunSummary:
    shards_done: int = 0
    shards_skipped: int = 0
    embedded: int = 0
    rejected: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        rate = (
            f"{self.embedded / self.seconds:,.0f} documents/s, {self.tokens / self.seconds:,.0f} tokens/s" if self.seconds else ""
        )
        return (
            f"{self.embedded:,} embedded, {self.rejected:,} rejected, {self.tokens:,} tokens in {self.seconds:,.1f} s "
            f"({rate}); {self.shards_done} shard(s) written, {self.shards_skipped} already done"
        )


class Manifest:
    """OUTPUT_DIR/manifest.json: the job's fingerprint and, per finished shard, its counts."""

    def __init__(self, job: CorpusJob):
        self.path = job.output_dir / MANIFEST
        fingerprint = job.fingerprint()
        if self.path.exists():
            self.document = json.loads(self.path.read_text())
            if self.document["job"] != fingerprint:
                changed = sorted(k for k in fingerprint if self.document["job"].get(k) != fingerprint[k])
                raise CorpusError(
                    f"{job.output_dir} holds a run with other settings or another input ({', '.join(changed)} differ); "
                    "re-run with the same arguments and input to resume, or give a new OUTPUT_DIR"
                )
        else:
            self.document = {"job": fingerprint, "shards": {}}

    def done(self, number: int) -> bool:
        return shard_name(number) in self.document["shards"]

    def finish(self, number: int, counts: dict) -> None:
        self.document["shards"][shard_name(number)] = counts
        write_json_atomically(self.document, self.path)


async def run(job: CorpusJob, show_progress: bool = True) -> RunSummary:
    """Embeds every shard not yet in the manifest; see the module docstring."""
    if job.dtype not in DTYPES:
        raise CorpusError(f"dtype must be one of {', '.join(DTYPES)}, got {job.dtype!r}")
    if not job.input.is_file():
        raise CorpusError(f"{job.input}: no such file")
    input_format(job.input)
    job.output_dir.mkdir(parents=True, exist_ok=True)
    remove_partials(job.output_dir)
    manifest = Manifest(job)
    summary, started = RunSummary(), time.monotonic()
    total = await asyncio.to_thread(check_ids, job.input, job.id_field, job.text_field)  # before anything is sent
    client = fleet_client(job.urls, job.model, job.concurrency, job.inference_key, job.max_retries)
    done_rows = sum(counts["rows"] for counts in manifest.document["shards"].values())
    slots = asyncio.Semaphore(SHARDS_IN_FLIGHT)

    async def embed_shard(shard: Shard, progress: tqdm) -> None:
        try:
            result = await embed_texts(client, shard.texts, job.options, job.batch_size, shard.problems)
            # the loop keeps answering meanwhile
            await asyncio.to_thread(write_shard, job.output_dir, shard, result, job.dtype)
            counts = {"rows": len(shard.texts), "embedded": len(result.embedded), "rejected": len(result.rejected),
                      "tokens": int(result.tokens.sum())}  # fmt: skip
            manifest.finish(shard.number, counts)
        finally:
            slots.release()
        summary.shards_done += 1
        summary.embedded += counts["embedded"]
        summary.rejected += counts["rejected"]
        summary.tokens += counts["tokens"]
        progress.update(len(shard.texts))
        elapsed = time.monotonic() - started
        progress.set_postfix_str(f"{summary.tokens / elapsed:,.0f} tokens/s, {summary.rejected:,} rejected", refresh=False)

    tasks: list[asyncio.Task] = []
    try:
        with tqdm(
            total=total, initial=done_rows, unit="doc", unit_scale=True, disable=not show_progress, smoothing=0.1
        ) as progress:
            reader = iter(shards(job.input, job.id_field, job.text_field, job.shard_rows))
            while (shard := await asyncio.to_thread(next, reader, None)) is not None:
                if manifest.done(shard.number):
                    summary.shards_skipped += 1
                    continue
                await slots.acquire()
                tasks.append(asyncio.create_task(embed_shard(shard, progress)))
                for task in [t for t in tasks if t.done()]:
                    task.result()  # the first failure stops the run
                    tasks.remove(task)
            await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()
    summary.seconds = time.monotonic() - started
    return summary
