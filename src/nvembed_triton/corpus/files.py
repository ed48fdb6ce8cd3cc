"""The bulk embedder's files: reading a corpus in shards, streaming, and writing each shard's
Parquet files and the manifest atomically (write, then rename), so that a run killed at any moment
leaves only whole files and a manifest that names only shards whose files are complete."""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

try:
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq
except ModuleNotFoundError as missing:  # the light client install has no pyarrow
    hint = "pip install 'nvembed-triton[corpus]' (from a checkout: pip install '.[corpus]')"
    raise ModuleNotFoundError(f"{missing.name} is not installed: {hint}") from None

EMBEDDINGS_DIR = "embeddings"
REJECTS_DIR = "rejects"
MANIFEST = "manifest.json"
READ_BLOCK_BYTES = 8 << 20  # CSV is parsed this much at a time (JSONL a line at a time)
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


class CorpusError(ValueError):
    """An input or output the embedder cannot use; the message says what to change."""


@dataclass
class Shard:
    """Rows [number * shard_rows, ...) of the input: their ids (as typed in the input), texts, where
    each is in the input (its line in JSONL, its row number in CSV and Parquet: from 1) and, for the
    rows that could not be read, why (position -> (reason, message)); their text is None."""

    number: int
    ids: pa.Array
    texts: list[str | None]
    lines: list[int]
    problems: dict[int, tuple[str, str]] = field(default_factory=dict)


@dataclass
class Rows:
    """A block of input rows, as Shard's fields."""

    ids: list
    texts: list[str | None]
    lines: list[int]
    problems: dict[int, tuple[str, str]] = field(default_factory=dict)


def input_format(path: Path) -> str:
    try:
        return FORMATS[path.suffix.lower()]
    except KeyError:
        raise CorpusError(f"{path}: unknown format {path.suffix!r}; name it .jsonl, .csv or .parquet") from None


def read_rows(path: Path, id_field: str, text_field: str) -> Iterator[Rows]:
    """The ids and texts, a block at a time (the corpus is never in memory as a whole). A row that
    cannot be read (malformed, not UTF-8, not an object, a text that is not a string) is kept as a
    problem with its line, and reading goes on."""
    kind = input_format(path)
    if kind == "jsonl":
        yield from _jsonl_rows(path, id_field, text_field)
        return
    if kind == "parquet":
        source = pq.ParquetFile(path)
        missing = {id_field, text_field} - set(source.schema_arrow.names)
        if missing:
            raise CorpusError(f"{path} has no column {', '.join(sorted(missing))}; it has {', '.join(source.schema_arrow.names)}")
        batches = source.iter_batches(columns=[id_field, text_field])
    else:  # CSV: every value read as bytes, decoded here, so a bad value is one row's problem
        batches = _csv_batches(path, id_field, text_field)
    line = 1
    for batch in batches:
        ids, raw = batch.column(0).to_pylist(), batch.column(1)
        if not (pa.types.is_string(raw.type) or pa.types.is_large_string(raw.type) or pa.types.is_binary(raw.type)
                or pa.types.is_null(raw.type)):  # fmt: skip
            raise CorpusError(f"{path}: the text field holds {raw.type} values, not strings")
        rows = Rows(ids, [], list(range(line, line + batch.num_rows)))  # row numbers: CSV fields may span lines
        for position, value in enumerate(raw.to_pylist()):
            rows.texts.append(_text(value, position, rows.problems))
        if pa.types.is_binary(batch.column(0).type):
            rows.ids = [None if i is None else i.decode("utf-8", "replace") for i in ids]
        line += batch.num_rows
        yield rows


def _text(value, position: int, problems: dict[int, tuple[str, str]]) -> str | None:
    """A text as read: bytes decoded (a bad one becomes the row's problem), strings as they are."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as error:
            problems[position] = ("not_utf8", f"the text is not valid UTF-8 ({error.reason} at byte {error.start})")
            return None
    return value


def _csv_batches(path: Path, id_field: str, text_field: str) -> Iterator[pa.RecordBatch]:
    try:
        reader = pa_csv.open_csv(
            path,
            read_options=pa_csv.ReadOptions(block_size=READ_BLOCK_BYTES),
            convert_options=pa_csv.ConvertOptions(
                include_columns=[id_field, text_field], column_types={id_field: pa.binary(), text_field: pa.binary()}
            ),
        )
        yield from reader
    except pa.ArrowInvalid as error:
        if "Empty CSV file" in str(error):
            return
        raise CorpusError(f"{path}: {error}") from None
    except KeyError as error:  # pyarrow names a missing include_columns entry this way
        raise CorpusError(f"{path} has no column {error}") from None


JSON_ROWS_PER_BLOCK = 4096


def _jsonl_rows(path: Path, id_field: str, text_field: str) -> Iterator[Rows]:
    """JSONL a line at a time (a line of any length that fits in memory), so that one bad line is
    that row's problem, not the run's end. Blank lines are not rows."""
    rows = Rows([], [], [])
    seen_fields: set[str] = set()
    with open(path, "rb") as source:
        for number, raw in enumerate(source, start=1):
            if not raw.strip():
                continue
            position = len(rows.texts)
            rows.lines.append(number)
            identifier, text = None, None
            try:
                record = json.loads(raw)
            except UnicodeDecodeError as error:
                rows.problems[position] = ("not_utf8", f"line {number} is not valid UTF-8 ({error.reason} at byte {error.start})")
            except ValueError as error:
                rows.problems[position] = ("malformed", f"line {number} is not valid JSON: {error}")
            else:
                if not isinstance(record, dict):
                    rows.problems[position] = ("malformed", f"line {number} is not a JSON object")
                else:
                    seen_fields |= record.keys()
                    identifier, text = record.get(id_field), record.get(text_field)
                    if text is not None and not isinstance(text, str):
                        rows.problems[position] = ("malformed", f"the text field holds a {type(text).__name__}, not a string")
                        text = None
            rows.ids.append(identifier)
            rows.texts.append(text)
            if len(rows.texts) == JSON_ROWS_PER_BLOCK:
                _check_fields(path, seen_fields, id_field, text_field)
                yield rows
                rows = Rows([], [], [])
    if rows.texts:
        _check_fields(path, seen_fields, id_field, text_field)
        yield rows


def _check_fields(path: Path, seen: set[str], id_field: str, text_field: str) -> None:
    """A field that no row so far has: the arguments name the wrong field, not bad rows."""
    missing = {id_field, text_field} - seen
    if missing and seen:
        raise CorpusError(f"{path} has no field {', '.join(sorted(missing))}; it has {', '.join(sorted(seen))}")


def shards(path: Path, id_field: str, text_field: str, shard_rows: int) -> Iterator[Shard]:
    """The input cut into shards of shard_rows rows (the last may be shorter), in input order: the
    same input and shard_rows always give the same shards, which is what makes a run resumable."""
    pending = Rows([], [], [])
    number = 0
    for block in read_rows(path, id_field, text_field):
        offset = len(pending.texts)
        pending.ids += block.ids
        pending.texts += block.texts
        pending.lines += block.lines
        pending.problems.update({offset + position: problem for position, problem in block.problems.items()})
        while len(pending.texts) >= shard_rows:
            yield _shard(number, pending, 0, shard_rows)
            pending = _rest(pending, shard_rows)
            number += 1
    if pending.texts:
        yield _shard(number, pending, 0, len(pending.texts))


def _shard(number: int, rows: Rows, start: int, stop: int) -> Shard:
    problems = {p - start: problem for p, problem in rows.problems.items() if start <= p < stop}
    return Shard(number, id_array(rows.ids[start:stop]), rows.texts[start:stop], rows.lines[start:stop], problems)


def _rest(rows: Rows, start: int) -> Rows:
    problems = {p - start: problem for p, problem in rows.problems.items() if p >= start}
    return Rows(rows.ids[start:], rows.texts[start:], rows.lines[start:], problems)


ID_EXAMPLES = 5  # problems with ids named in the error, then a count


def check_ids(path: Path, id_field: str, text_field: str) -> int:
    """Before anything is sent: every readable row has an id, and no id appears twice (the output is
    keyed by id, and a resumed run finds its place by it). A CorpusError names the first rows
    otherwise; returns the number of rows. One pass over the input keeping 8 bytes per row (a hash
    of each id), and for hashes seen twice, a second pass comparing the ids themselves."""
    hashes, missing, rows = array("Q"), [], 0
    for block in read_rows(path, id_field, text_field):
        for position, identifier in enumerate(block.ids):
            if position in block.problems:
                continue  # unreadable: a reject of its own, with its line
            if identifier is None:
                missing.append(block.lines[position])
            else:
                hashes.append(_id_hash(identifier))
        rows += len(block.texts)
    if rows == 0:
        raise CorpusError(f"{path} holds no rows")
    problems = []
    if missing:
        problems.append(f"{len(missing)} row(s) without an id (field {id_field!r}), first at {_examples(missing, ', ')}")
    values = np.frombuffer(hashes, dtype=np.uint64)
    ordered = np.sort(values)
    repeated = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
    if repeated:
        seen: dict[str, int] = {}
        duplicates = []
        for block in read_rows(path, id_field, text_field):
            for position, identifier in enumerate(block.ids):
                if identifier is None or position in block.problems or _id_hash(identifier) not in repeated:
                    continue
                key = json.dumps(identifier)
                if key in seen:
                    duplicates.append(f"{key} at {block.lines[position]} (first at {seen[key]})")
                else:
                    seen[key] = block.lines[position]
        if duplicates:
            problems.append(f"{len(duplicates)} repeated id(s): {_examples(duplicates, '; ')}")
    if problems:
        raise CorpusError(f"{path}: {'; '.join(problems)} (lines in JSONL, rows in CSV and Parquet). Every row needs an id "
                          "of its own: nothing was sent")  # fmt: skip
    return rows


def _id_hash(identifier) -> int:
    return int.from_bytes(hashlib.blake2b(json.dumps(identifier).encode(), digest_size=8).digest(), "little")


def _examples(items: list, separator: str) -> str:
    more = f"{separator}and {len(items) - ID_EXAMPLES} more" if len(items) > ID_EXAMPLES else ""
    return separator.join(map(str, items[:ID_EXAMPLES])) + more


def id_array(ids: list) -> pa.Array:
    """The ids as typed in the input; ids of mixed types (JSONL allows them) as their JSON text."""
    try:
        return pa.array(ids)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if i is None else i if isinstance(i, str) else json.dumps(i) for i in ids], pa.string())


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


def rejects_table(ids: pa.Array, lines: list[int], reasons: list[str], messages: list[str]) -> pa.Table:
    """id (null for a row that could not be read), line (JSONL) or row number, reason, message."""
    return pa.table({"id": ids, "line": pa.array(lines, pa.int64()), "reason": pa.array(reasons, pa.string()),
                     "message": pa.array(messages, pa.string())})  # fmt: skip


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
    rejected = pa.array(result.rejected, pa.int64())
    lines = [shard.lines[position] for position in result.rejected]
    rejects = rejects_table(shard.ids.take(rejected), lines, result.reasons, result.messages)
    write_atomically(rejects, output_dir / REJECTS_DIR / name)
    embedded = shard.ids.take(pa.array(result.embedded, pa.int64()))
    write_atomically(
        embeddings_table(embedded, result.vectors, result.tokens, result.truncated, dtype), output_dir / EMBEDDINGS_DIR / name
    )
