"""The bulk embedder's files: reading a corpus in shards, streaming, and writing each shard's
Parquet files and the manifest atomically (write, then rename), so that a run killed at any moment
leaves only whole files and a manifest that names only shards whose files are complete."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

try:
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.json as pa_json
    import pyarrow.parquet as pq
except ModuleNotFoundError as missing:  # the light client install has no pyarrow
    raise ModuleNotFoundError(f"{missing.name} is not installed: pip install 'nvembed-triton[corpus]'") from None

EMBEDDINGS_DIR = "embeddings"
REJECTS_DIR = "rejects"
MANIFEST = "manifest.json"
READ_BLOCK_BYTES = 8 << 20  # JSONL and CSV are parsed this much at a time
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


class CorpusError(ValueError):
    """An input or output the embedder cannot use; the message says what to change."""


@dataclass
class Shard:
    """Rows [number * shard_rows, ...) of the input: their ids (as typed in the input) and texts."""

    number: int
    ids: pa.Array
    texts: list[str | None]


def input_format(path: Path) -> str:
    try:
        return FORMATS[path.suffix.lower()]
    except KeyError:
        raise CorpusError(f"{path}: unknown format {path.suffix!r}; name it .jsonl, .csv or .parquet") from None


def count_rows(path: Path) -> int | None:
    """Rows in the input, for the progress bar's ETA: Parquet's metadata, a JSONL file's lines
    (one fast pass over the bytes); None for CSV, whose quoted fields may hold newlines."""
    kind = input_format(path)
    if kind == "parquet":
        return pq.ParquetFile(path).metadata.num_rows
    if kind == "jsonl":
        lines, last = 0, b"\n"
        with open(path, "rb") as source:
            while block := source.read(READ_BLOCK_BYTES):
                lines += block.count(b"\n")
                last = block[-1:]
        return lines + (last != b"\n")
    return None


def record_batches(path: Path, id_field: str, text_field: str) -> Iterator[pa.RecordBatch]:
    """The two columns, a block at a time: the corpus is never in memory as a whole."""
    kind = input_format(path)
    if kind == "parquet":
        source = pq.ParquetFile(path)
        missing = {id_field, text_field} - set(source.schema_arrow.names)
        if missing:
            raise CorpusError(f"{path} has no column {', '.join(sorted(missing))}; it has {', '.join(source.schema_arrow.names)}")
        yield from source.iter_batches(columns=[id_field, text_field])
        return
    if kind == "csv":  # every value stays a string: CSV has no types, and "007" is an id, not 7
        reader = pa_csv.open_csv(
            path,
            read_options=pa_csv.ReadOptions(block_size=READ_BLOCK_BYTES),
            convert_options=pa_csv.ConvertOptions(
                include_columns=[id_field, text_field], column_types={id_field: pa.string(), text_field: pa.string()}
            ),
        )
    else:
        reader = pa_json.open_json(path, read_options=pa_json.ReadOptions(block_size=READ_BLOCK_BYTES))
    try:
        for batch in reader:
            missing = {id_field, text_field} - set(batch.schema.names)
            if missing:
                raise CorpusError(f"{path} has no field {', '.join(sorted(missing))}; it has {', '.join(batch.schema.names)}")
            yield pa.RecordBatch.from_arrays([batch.column(id_field), batch.column(text_field)], names=[id_field, text_field])
    except pa.ArrowInvalid as error:
        raise CorpusError(f"{path}: {error}") from None


def shards(path: Path, id_field: str, text_field: str, shard_rows: int) -> Iterator[Shard]:
    """The input cut into shards of shard_rows rows (the last may be shorter), in input order: the
    same input and shard_rows always give the same shards, which is what makes a run resumable."""
    pending: list[pa.RecordBatch] = []
    held, number = 0, 0
    for batch in record_batches(path, id_field, text_field):
        pending.append(batch)
        held += batch.num_rows
        while held >= shard_rows:
            table = pa.Table.from_batches(pending)
            yield _shard(number, table.slice(0, shard_rows))
            rest = table.slice(shard_rows)
            pending, held, number = rest.to_batches(), rest.num_rows, number + 1
    if held:
        yield _shard(number, pa.Table.from_batches(pending))


def _shard(number: int, table: pa.Table) -> Shard:
    texts = table.column(1)
    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type) or pa.types.is_null(texts.type)):
        raise CorpusError(f"the text field holds {texts.type} values, not strings (shard {number})")
    return Shard(number, table.column(0).combine_chunks(), texts.to_pylist())


@dataclass
class EmbeddedTexts:
    """One batch of texts: vectors for those embedded (at `embedded`, positions in the batch), the
    reason and message for each refused one."""

    embedded: list[int]
    vectors: np.ndarray
    tokens: np.ndarray
    truncated: np.ndarray
    rejected: list[int] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)


def shard_name(number: int) -> str:
    return f"part-{number:06d}.parquet"


def vector_list(vectors: np.ndarray, dtype: str, present: np.ndarray | None = None) -> pa.ListArray:
    """A list<float32|float16> column: `vectors` holds one row per True in `present` (default: every
    row present); the other rows are null, with no values underneath (Parquet cannot store a null
    list that has values)."""
    present = np.ones(len(vectors), bool) if present is None else present
    dimension = vectors.shape[1] if vectors.ndim == 2 else 0
    offsets = np.concatenate([[0], np.cumsum(present * dimension)]).astype(np.int32)
    values = pa.array(vectors.astype(dtype).reshape(-1))
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=pa.array(~present))


def embeddings_table(ids: pa.Array, vectors: np.ndarray, tokens: np.ndarray, truncated: np.ndarray, dtype: str) -> pa.Table:
    """id, embedding (a list of float32 or float16), tokens, truncated."""
    return pa.table(
        {
            "id": ids,
            "embedding": vector_list(vectors, dtype),
            "tokens": pa.array(tokens, pa.int32()),
            "truncated": pa.array(truncated, pa.bool_()),
        }
    )


def rejects_table(ids: pa.Array, reasons: list[str], messages: list[str]) -> pa.Table:
    return pa.table({"id": ids, "reason": pa.array(reasons, pa.string()), "message": pa.array(messages, pa.string())})


def write_atomically(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    pq.write_table(table, partial)
    os.replace(partial, path)


def write_json_atomically(document: dict, path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(document, indent=2))
    os.replace(partial, path)


def remove_partials(output_dir: Path) -> None:
    """Files a killed run was writing: never named in the manifest, so never counted."""
    for partial in output_dir.rglob("*.partial"):
        partial.unlink()


def write_shard(output_dir: Path, shard: Shard, result: EmbeddedTexts, dtype: str) -> None:
    """Rejects first, then embeddings, each whole or not at all; the manifest names the shard after."""
    name = shard_name(shard.number)
    rejects = rejects_table(shard.ids.take(pa.array(result.rejected, pa.int64())), result.reasons, result.messages)
    write_atomically(rejects, output_dir / REJECTS_DIR / name)
    embedded = shard.ids.take(pa.array(result.embedded, pa.int64()))
    write_atomically(
        embeddings_table(embedded, result.vectors, result.tokens, result.truncated, dtype), output_dir / EMBEDDINGS_DIR / name
    )
