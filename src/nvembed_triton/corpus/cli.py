"""Embed a whole corpus through one or several servers into Parquet, resumably.

    nvembed-triton-embed-corpus INPUT OUTPUT_DIR --url HOST:PORT[,HOST:PORT...] --text-field TEXT --id-field ID

INPUT is JSONL, CSV or Parquet, read a block at a time (JSONL a line at a time, of any length). Every
row needs an id of its own: a missing or repeated id is refused, naming its lines, before anything
is sent. Its rows are cut into shards of --shard-rows; each shard's vectors go to
OUTPUT_DIR/embeddings/part-NNNNNN.parquet (id, embedding, tokens, truncated) and the rows not
embedded to OUTPUT_DIR/rejects/part-NNNNNN.parquet (id, line, reason, message): texts the server
refused, empty ones, and lines that could not be read (malformed JSON, not UTF-8), which do not stop
the run. OUTPUT_DIR/manifest.json names the finished shards. A server that requires an inference
key gets the one in NVEMBED_INFERENCE_KEY. Run the same command again
after a crash or Ctrl-C and it carries on from the first unfinished shard: every id ends up exactly
once, in embeddings or in rejects. Several servers share the work through gRPC's round-robin, and a
server that goes away mid-run is skipped while its requests are retried on the others.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from nvembed_triton.corpus.embedder import DEFAULT_BATCH_SIZE, DEFAULT_SHARD_ROWS, DTYPES, REQUESTS_PER_SERVER, CorpusJob, run
from nvembed_triton.corpus.files import CorpusError
from nvembed_triton.protocol import contract
from nvembed_triton.protocol.errors import EmbeddingError
from nvembed_triton.protocol.options import RequestOptions
from nvembed_triton.settings import launcher_setting


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(
        prog="nvembed-triton-embed-corpus", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_argument("input", type=Path, help="the corpus: .jsonl, .csv or .parquet")
    cli.add_argument("output_dir", type=Path, help="where the Parquet shards and the manifest go (re-use it to resume)")
    cli.add_argument("--url", required=True, help="the server's gRPC HOST:PORT; several, comma-separated, share the work")
    cli.add_argument("--text-field", required=True, help="the column or JSON field holding the text")
    cli.add_argument("--id-field", required=True, help="the column or JSON field holding each text's id")
    RequestOptions.add_arguments(cli)  # --instruction, --prompt-name (default document), --truncate (NONE: rejects)
    cli.add_argument("--dtype", choices=DTYPES, default="float32", help="of the stored vectors")
    cli.add_argument("--shard-rows", type=int, default=DEFAULT_SHARD_ROWS, help="input rows per output file")
    cli.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="texts per request")
    cli.add_argument("--concurrency", type=int, help=f"requests in flight (default {REQUESTS_PER_SERVER} per server)")
    cli.add_argument("--model", default=contract.PUBLIC_MODEL)
    cli.add_argument("--no-progress", action="store_true", help="no progress bar (the summary is still printed)")
    return cli


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.shard_rows < 1 or args.batch_size < 1 or (args.concurrency is not None and args.concurrency < 1):
        parser().error("--shard-rows, --batch-size and --concurrency must be positive")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    job = CorpusJob(
        input=args.input,
        output_dir=args.output_dir,
        urls=tuple(url.strip() for url in args.url.split(",") if url.strip()),
        text_field=args.text_field,
        id_field=args.id_field,
        options=RequestOptions.from_arguments(args),
        dtype=args.dtype,
        shard_rows=args.shard_rows,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        model=args.model,
        # From the environment only: a flag would show the key to every local user (ps).
        inference_key=launcher_setting("inference_key") or None,
    )
    try:
        summary = asyncio.run(run(job, show_progress=not args.no_progress))
    except CorpusError as error:
        print(f"nvembed-triton-embed-corpus: {error}", file=sys.stderr)
        return 2
    except EmbeddingError as error:
        print(f"nvembed-triton-embed-corpus: stopped: {error}\nfinished shards are kept: run the same command again "
              "to resume", file=sys.stderr)  # fmt: skip
        return 1
    except KeyboardInterrupt:
        print("nvembed-triton-embed-corpus: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(f"nvembed-triton-embed-corpus: {summary.line()}; output in {job.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
