"""The engine's memory under the soak's mixed texts, in-process: no server, so what grows is the
engine's (torch, oneDNN, the tokenizer, malloc) and nothing of Triton's. Each round is a fresh
process that loads the encoder and encodes what the soak sends (1-4 requests of 1 or 1-64 texts of
1-2000 characters, concatenated as a lane would) for --minutes, sampling its RssAnon; rounds
alternate between this checkout and --before (another checkout's src, e.g. made with
`git worktree add /tmp/before <commit>`), so both see the same texts and the same machine.

    .venv/bin/python bench/bench_engine_memory.py [--before /tmp/before] [--minutes 2] [--rounds 3]
        [--model-dir DIR] [--sample-s 15] [--json PATH]

Prints, per version, the median over rounds of: RssAnon after load, at each minute and at the end;
the slope over the second half of each round; texts encoded per minute after the first minute.
Writes every sample to the JSON (default bench/results/engine-memory-<time>.json). Run nothing else
meanwhile: the texts per minute are a throughput on a shared machine."""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_soak import random_text
from shared import model_dir_or_tiny, write_json

ROOT = Path(__file__).resolve().parents[1]


def rss_anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def child(model_dir: str, minutes: float, sample_s: float, seed: int) -> None:
    """One round: load, then encode the soak's texts, printing one JSON line per sample."""
    from nvembed_triton.engine.encoders import load_encoder
    from nvembed_triton.protocol.options import TextOptions
    from nvembed_triton.settings import EncoderSettings

    encoder = load_encoder(EncoderSettings.from_parameters({"model_dir": model_dir, "device": "cpu"}))
    print(json.dumps({"minute": 0.0, "rss_anon_mb": rss_anon_mb(), "texts": 0}), flush=True)
    rng = random.Random(seed)
    started = time.monotonic()
    next_sample, texts_done = started + sample_s, 0
    while (now := time.monotonic()) < started + minutes * 60:
        texts = []
        for _ in range(rng.randint(1, 4)):  # requests a lane takes together
            texts += [random_text(rng) for _ in range(1 if rng.random() < 0.25 else rng.randint(1, 64))]
        encoder.encode(texts, TextOptions.each(len(texts)))
        texts_done += len(texts)
        if now >= next_sample:
            print(json.dumps({"minute": (now - started) / 60, "rss_anon_mb": rss_anon_mb(), "texts": texts_done}), flush=True)
            next_sample += sample_s


def run_round(src: Path, model_dir: Path, args) -> list[dict]:
    command = [sys.executable, __file__, "--child", "--model-dir", str(model_dir), "--minutes", str(args.minutes),
               "--sample-s", str(args.sample_s), "--seed", str(args.seed)]  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(ROOT / "bench")])}
    out = subprocess.run(command, env=environment, capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def summarise(rounds: list[list[dict]], minutes: float) -> dict:
    def median_at(minute: float) -> float:
        return statistics.median(min(r, key=lambda s: abs(s["minute"] - minute))["rss_anon_mb"] for r in rounds)

    def slope(samples: list[dict]) -> float:
        late = [s for s in samples if s["minute"] >= minutes / 2]
        return float(np.polyfit([s["minute"] for s in late], [s["rss_anon_mb"] for s in late], 1)[0])

    def rate(samples: list[dict]) -> float:
        first = min(samples, key=lambda s: abs(s["minute"] - min(1.0, minutes / 2)))
        return (samples[-1]["texts"] - first["texts"]) / (samples[-1]["minute"] - first["minute"])

    marks = {f"{m:g} min": median_at(m) for m in [0, *range(1, int(minutes) + 1)]}
    return {"rss_anon_mb": marks, "end_mb": median_at(rounds[0][-1]["minute"]),
            "slope_mb_per_min": statistics.median(slope(r) for r in rounds),
            "texts_per_min": statistics.median(rate(r) for r in rounds)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="another checkout, measured in alternating rounds")
    parser.add_argument("--minutes", type=float, default=2.0, help="how long each round encodes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sample-s", type=float, default=15.0)
    parser.add_argument("--model-dir", help="default: a generated tiny random NV-Embed-v2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.model_dir, args.minutes, args.sample_s, args.seed)
        return 0
    versions = {"this checkout": ROOT / "src", **({"before": args.before / "src"} if args.before else {})}
    samples: dict[str, list[list[dict]]] = {name: [] for name in versions}
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = model_dir_or_tiny(args.model_dir, Path(scratch))
        for number in range(args.rounds):
            order = list(versions.items()) if number % 2 == 0 else list(versions.items())[::-1]
            for name, src in order:
                print(f"round {number + 1}: {name} (load {os.getloadavg()[0]:.2f})", flush=True)
                samples[name].append(run_round(src, model_dir, args))
    summaries = {name: summarise(rounds, args.minutes) for name, rounds in samples.items()}
    for name, s in summaries.items():
        marks = ", ".join(f"{mark} {mb:.0f}" for mark, mb in s["rss_anon_mb"].items())
        print(f"{name}: RssAnon MB {marks}; slope over the second half {s['slope_mb_per_min']:+.1f} MB/min; "
              f"{s['texts_per_min']:.0f} texts/min after the first minute")  # fmt: skip
    if args.before:
        after, before = summaries["this checkout"], summaries["before"]
        print(f"after / before: memory at the end {after['end_mb'] / before['end_mb']:.2f}x, "
              f"texts per minute {after['texts_per_min'] / before['texts_per_min']:.2f}x")  # fmt: skip
    write_json(
        {"args": {k: str(v) for k, v in vars(args).items()}, "summaries": summaries, "samples": samples},
        args.json or str(ROOT / f"bench/results/engine-memory-{time.strftime('%Y%m%d-%H%M%S')}.json"),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
