"""The bulk corpus embedder (nvembed-triton-embed-corpus) and its Ray Data transform. Reading and
the manifest are unit tests; the runs are against real tritonservers: two of them, one killed
mid-run, the run itself killed and resumed; and Ray Data on a local Ray cluster."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from conftest import TEST_MAX_LENGTH, start_tiny_server, stop_server

from nvembed_triton.client import EmbeddingClient
from nvembed_triton.corpus.embedder import CorpusJob, Manifest, grpc_target
from nvembed_triton.corpus.files import CorpusError, check_ids, shards
from nvembed_triton.protocol.options import RequestOptions

WORDS = "bread flour water salt yeast oven crust crumb dough proof knead bake rye wheat starter".split()


def corpus_rows(count: int, seed: int = 0) -> list[dict]:
    """Documents of 3-120 words, with a few that must be refused: empty, missing, and (with
    truncate NONE) longer than the test servers' max_length."""
    rng = random.Random(seed)
    rows = [{"id": f"doc-{i:05d}", "text": " ".join(rng.choices(WORDS, k=rng.randint(3, 120)))} for i in range(count)]
    for i in (7, 311, count - 1):
        rows[i]["text"] = ""
    for i in (42, 500):
        rows[i]["text"] = None
    for i in (99, 250, 777, 1234):
        rows[i]["text"] = " ".join(rng.choices(WORDS, k=2 * TEST_MAX_LENGTH))
    return rows


def write_jsonl(rows: list[dict], path: Path, trailing_newline: bool = True) -> Path:
    path.write_text("\n".join(json.dumps(row) for row in rows) + ("\n" if trailing_newline else ""))
    return path


def read_output(output_dir: Path) -> tuple[pa.Table, pa.Table]:
    embeddings = pa.concat_tables([pq.read_table(p) for p in sorted((output_dir / "embeddings").glob("*.parquet"))])
    rejects = pa.concat_tables([pq.read_table(p) for p in sorted((output_dir / "rejects").glob("*.parquet"))])
    return embeddings, rejects


# ---- reading and the manifest (no server) ----


def test_the_three_formats_give_the_same_shards(tmp_path):
    rows = corpus_rows(1300)[:25]
    table = pa.Table.from_pylist(rows)
    paths = [write_jsonl(rows, tmp_path / "c.jsonl"), tmp_path / "c.parquet", tmp_path / "c.csv"]
    pq.write_table(table, paths[1], row_group_size=4)  # several row groups: shards cross them
    pa_csv.write_csv(table, paths[2])
    cut = {path.suffix: list(shards(path, "id", "text", 7)) for path in paths}
    for found in cut.values():
        assert [s.number for s in found] == [0, 1, 2, 3]
        assert [len(s.texts) for s in found] == [7, 7, 7, 4]
        assert [i for s in found for i in s.ids.to_pylist()] == [row["id"] for row in rows]
        # CSV has no null: a missing text reads as "" there; both are refused as empty
        assert [t or "" for s in found for t in s.texts] == [row["text"] or "" for row in rows]
        assert [line for s in found for line in s.lines] == list(range(1, 26)) and not any(s.problems for s in found)
    assert all(check_ids(path, "id", "text") == 25 for path in paths)
    assert check_ids(write_jsonl(rows, tmp_path / "n.jsonl", trailing_newline=False), "id", "text") == 25


def test_csv_ids_stay_strings(tmp_path):
    (tmp_path / "c.csv").write_text("id,text\n007,bread\n8,flour\n")
    (shard,) = shards(tmp_path / "c.csv", "id", "text", 10)
    assert shard.ids.to_pylist() == ["007", "8"]


def test_a_missing_field_or_format_is_named(tmp_path):
    path = write_jsonl([{"key": 1, "body": "x"}], tmp_path / "c.jsonl")
    with pytest.raises(CorpusError, match="no field id, text; it has body, key"):
        list(shards(path, "id", "text", 10))
    with pytest.raises(CorpusError, match="unknown format '.txt'"):
        list(shards(tmp_path / "c.txt", "id", "text", 10))


def test_lines_that_cannot_be_read_are_each_a_rows_problem_and_reading_goes_on(tmp_path):
    """Malformed JSON, bytes that are not UTF-8, a value that is not an object, a text that is not a
    string: each is its row's problem, with its line, and the rows after it are read. A line of
    9 MiB (over any block size) is read whole; blank lines are not rows."""
    long_text = "flour " * (9 * 2**20 // 6)
    lines = [
        json.dumps({"id": "a", "text": "bread"}).encode(),
        b'{"id": "b", "text": "unterminated',
        json.dumps({"id": "c", "text": "caf\u00e9"}).encode().replace(b"\\u00e9", b"\xe9"),
        b"",
        b"[1, 2]",
        json.dumps({"id": "e", "text": 12}).encode(),
        json.dumps({"id": "f", "text": long_text}).encode(),
        json.dumps({"id": "g", "text": "yeast"}).encode(),
    ]
    path = tmp_path / "c.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    (shard,) = shards(path, "id", "text", 100)
    assert shard.lines == [1, 2, 3, 5, 6, 7, 8]  # line 4 is blank
    reasons = {shard.lines[position]: reason for position, (reason, _) in shard.problems.items()}
    assert reasons == {2: "malformed", 3: "not_utf8", 5: "malformed", 6: "malformed"}
    assert "line 3 is not valid UTF-8" in shard.problems[2][1] and "line 2 is not valid JSON" in shard.problems[1][1]
    assert shard.texts[0] == "bread" and shard.texts[5] == long_text and shard.texts[6] == "yeast"
    assert shard.ids.to_pylist() == ["a", None, None, None, "e", "f", "g"]
    assert check_ids(path, "id", "text") == 7  # unreadable rows are rejects, not id problems


@pytest.mark.parametrize("content", ["", "\n\n", "id,text\n"], ids=["empty", "blank lines", "CSV header only"])
def test_an_input_without_rows_is_refused_in_one_line(tmp_path, content):
    path = tmp_path / ("c.csv" if content.startswith("id") else "c.jsonl")
    path.write_text(content)
    with pytest.raises(CorpusError, match="holds no rows"):
        check_ids(path, "id", "text")


def test_missing_and_repeated_ids_are_refused_naming_their_lines(tmp_path):
    rows = [{"id": 1, "text": "a"}, {"text": "no id"}, {"id": "x", "text": "b"}, {"id": 1, "text": "c"}, {"id": "x", "text": "d"},
            {"id": None, "text": "e"}, {"id": "1", "text": "a string, not the number 1"}]  # fmt: skip
    path = write_jsonl(rows, tmp_path / "c.jsonl")
    with pytest.raises(CorpusError) as raised:
        check_ids(path, "id", "text")
    message = str(raised.value)
    assert "2 row(s) without an id (field 'id'), first at 2, 6" in message
    assert "2 repeated id(s): 1 at 4 (first at 1); \"x\" at 5 (first at 3)" in message and "nothing was sent" in message


def test_the_command_refuses_repeated_ids_before_sending_anything(tmp_path):
    path = write_jsonl([{"id": 1, "text": "a"}, {"id": 1, "text": "b"}], tmp_path / "c.jsonl")
    command = [sys.executable, "-m", "nvembed_triton.corpus.cli", str(path), str(tmp_path / "out"), "--url", "127.0.0.1:1",
               "--text-field", "text", "--id-field", "id", "--no-progress"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "repeated id" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_resumed_run_must_match_the_first(tmp_path):
    path = write_jsonl(corpus_rows(1300)[:10], tmp_path / "c.jsonl")
    job = CorpusJob(path, tmp_path / "out", ("localhost:1",), "text", "id", shard_rows=5)
    job.output_dir.mkdir()
    manifest = Manifest(job)
    manifest.finish(0, {"rows": 5, "embedded": 5, "rejected": 0, "tokens": 50})
    assert Manifest(job).done(0) and not Manifest(job).done(1)
    for changed in (CorpusJob(path, job.output_dir, job.urls, "text", "id", shard_rows=6),
                    CorpusJob(path, job.output_dir, job.urls, "text", "id", RequestOptions(truncate="NONE"), 5)):  # fmt: skip
        with pytest.raises(CorpusError, match="holds a run with other settings"):
            Manifest(changed)
    path.write_text(path.read_text() + json.dumps({"id": "new", "text": "more"}) + "\n")
    with pytest.raises(CorpusError, match="input_bytes"):
        Manifest(job)


def test_several_servers_make_one_round_robin_target():
    assert grpc_target(["localhost:8001"]) == "localhost:8001"
    assert grpc_target(["localhost:8001", "127.0.0.1:9001"]) == "ipv4:127.0.0.1:8001,127.0.0.1:9001"
    with pytest.raises(CorpusError, match="HOST:PORT"):
        grpc_target(["localhost", "x:1"])


# ---- runs against real servers ----


def embedder(corpus: Path, output_dir: Path, urls: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "nvembed_triton.corpus.cli", str(corpus), str(output_dir), "--url", urls,
               "--text-field", "text", "--id-field", "id", "--truncate", "NONE", "--shard-rows", "100",
               "--batch-size", "8", "--concurrency", "2", "--no-progress"]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished_shards(output_dir: Path) -> int:
    try:
        return len(json.loads((output_dir / "manifest.json").read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def wait_for_shards(output_dir: Path, count: int, process: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while finished_shards(output_dir) < count:
        assert process.poll() is None, f"the run ended before {count} shards: {process.communicate()[0]}"
        assert time.monotonic() < deadline, f"fewer than {count} shards after {timeout_s} s"
        time.sleep(0.02)


def check_output(rows: list[dict], embeddings: pa.Table, rejects: pa.Table, url: str) -> None:
    """Every id exactly once; the refused ones with their reasons; every vector and token count as
    a direct call to the server gives them."""
    embedded_ids, rejected_ids = embeddings.column("id").to_pylist(), rejects.column("id").to_pylist()
    assert len(embedded_ids) == len(set(embedded_ids)) and len(rejected_ids) == len(set(rejected_ids))
    assert set(embedded_ids).isdisjoint(rejected_ids)
    assert set(embedded_ids) | set(rejected_ids) == {row["id"] for row in rows}
    by_id = {row["id"]: row["text"] for row in rows}
    reasons = dict(zip(rejected_ids, rejects.column("reason").to_pylist(), strict=True))
    assert reasons == {
        row["id"]: "empty" if not row["text"] else "invalid_input"
        for row in rows
        if not row["text"] or len(row["text"].split()) > TEST_MAX_LENGTH
    }
    too_long = [m for i, m in zip(rejected_ids, rejects.column("message").to_pylist(), strict=True) if reasons[i] != "empty"]
    assert all("truncate is NONE" in message for message in too_long), too_long
    texts = [by_id[i] for i in embedded_ids]
    with EmbeddingClient(url) as client:
        direct = client.embed_with_usage(texts, prompt_name="document")
    vectors = np.array(embeddings.column("embedding").to_pylist(), dtype=np.float32)
    assert vectors.shape == direct.embeddings.shape
    cosines = np.sum(vectors * direct.embeddings, axis=1)
    assert cosines.min() > 0.99999, cosines.min()
    assert embeddings.column("tokens").to_pylist() == direct.token_counts.tolist()


@pytest.mark.server
def test_a_killed_server_and_a_killed_run_lose_and_repeat_nothing(tmp_path_factory, tiny_checkpoint):
    tmp = tmp_path_factory.mktemp("corpus")
    rows = corpus_rows(3000)
    corpus = write_jsonl(rows, tmp / "corpus.jsonl")
    output_dir = tmp / "out"
    servers = [start_tiny_server(tmp_path_factory.mktemp(f"corpus-server-{i}"), tiny_checkpoint) for i in range(2)]
    urls = ",".join(server.url for server in servers)
    try:
        first = embedder(corpus, output_dir, urls)
        wait_for_shards(output_dir, 3, first)
        servers[0].process.kill()  # serve.sh killed: its tritonserver goes with it, and stays down
        servers[0].process.wait(30)
        wait_for_shards(output_dir, 8, first)
        first.kill()  # the run itself, with shards in flight
        first.wait(30)
        done_before = finished_shards(output_dir)
        assert done_before < 30, "the run finished before it could be interrupted"
        second = embedder(corpus, output_dir, urls)
        output, _ = second.communicate(timeout=600)
        assert second.returncode == 0, output
        assert f"{done_before} already done" in output
        assert finished_shards(output_dir) == 30
        assert not list(output_dir.rglob("*.partial"))
        embeddings, rejects = read_output(output_dir)
        check_output(rows, embeddings, rejects, servers[1].url)
    finally:
        for server in servers:
            stop_server(server)


@pytest.mark.server
def test_fp16_vectors_and_a_finished_run_rerun(nvembed_server, tmp_path):
    rows = corpus_rows(1300)[:300]
    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.Table.from_pylist(rows), corpus)
    command = [sys.executable, "-m", "nvembed_triton.corpus.cli", str(corpus), str(tmp_path / "out"),
               "--url", nvembed_server.url, "--text-field", "text", "--id-field", "id", "--dtype", "float16",
               "--shard-rows", "128", "--no-progress"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "rejected" in result.stdout and "3 shard(s) written" in result.stdout
    embeddings, rejects = read_output(tmp_path / "out")
    assert embeddings.schema.field("embedding").type == pa.list_(pa.float16())
    assert {len(vector) for vector in embeddings.column("embedding").to_pylist()} == {64}
    empty = [row["id"] for row in rows if not row["text"]]
    assert rejects.column("id").to_pylist() == empty and set(rejects.column("reason").to_pylist()) == {"empty"}
    assert embeddings.num_rows == len(rows) - len(empty)  # long texts are cut (truncate END), not refused
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "0 shard(s) written, 3 already done" in again.stdout, again.stdout


@pytest.mark.server
def test_a_run_over_bad_lines_embeds_the_rest_and_rejects_them_with_their_lines(nvembed_server, tmp_path):
    good = [{"id": f"doc-{i}", "text": f"bread and flour number {i}"} for i in range(6)]
    lines = [json.dumps(row).encode() for row in good]
    lines.insert(2, b'{"id": "broken", "text": ')
    lines.insert(4, b'{"id": "latin1", "text": "caf\xe9"}')
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b"\n".join(lines) + b"\n")
    command = [sys.executable, "-m", "nvembed_triton.corpus.cli", str(corpus), str(tmp_path / "out"), "--url",
               nvembed_server.url, "--text-field", "text", "--id-field", "id", "--shard-rows", "3", "--no-progress"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    embeddings, rejects = read_output(tmp_path / "out")
    assert sorted(embeddings.column("id").to_pylist()) == sorted(row["id"] for row in good)
    assert rejects.column("line").to_pylist() == [3, 5] and rejects.column("reason").to_pylist() == ["malformed", "not_utf8"]
    assert rejects.column("id").to_pylist() == [None, None]


@pytest.mark.server
def test_ray_data_embeds_a_corpus(nvembed_server, tmp_path):
    import ray

    from nvembed_triton.corpus.ray_transform import EmbedBatches

    rows = corpus_rows(1300)[:400]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "corpus.parquet")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        dataset = ray.data.read_parquet(str(tmp_path / "corpus.parquet")).map_batches(
            EmbedBatches,
            fn_constructor_kwargs={"url": nvembed_server.url, "text_field": "text", "id_field": "id", "truncate": "NONE"},
            batch_size=64,
            batch_format="pyarrow",
            concurrency=1,
        )
        dataset.write_parquet(str(tmp_path / "out"))
    finally:
        ray.shutdown()
    table = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "out").glob("*.parquet"))])
    refused = table.filter(pa.compute.is_valid(table.column("reason")))
    embedded = table.filter(pa.compute.is_null(table.column("reason")))
    assert embedded.column("embedding").null_count == 0 and refused.column("embedding").null_count == refused.num_rows
    check_output(
        rows,
        embedded.select(["id", "embedding", "tokens"]),
        refused.select(["id", "reason", "message"]),
        nvembed_server.url,
    )


def test_vector_lists_hold_nulls_without_values():
    """Ray's batches mix embedded and refused rows; a batch may have no vector at all."""
    from nvembed_triton.corpus.files import vector_list

    mixed = vector_list(np.ones((2, 3), np.float32), "float16", np.array([True, False, True]))
    assert mixed.type == pa.list_(pa.float16()) and mixed.to_pylist() == [[1.0] * 3, None, [1.0] * 3]
    assert vector_list(np.zeros((0, 0), np.float32), "float32", np.array([False, False])).to_pylist() == [None, None]
    table = pa.table({"embedding": mixed})
    pq.write_table(table, pa.BufferOutputStream())  # Parquet takes it (it refuses a null list with values)
