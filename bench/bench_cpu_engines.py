"""CPU engines for a sentence-transformers model, in-process, alternating rounds (issue: "the CPU
engine a user would pick"):

    .venv/bin/python bench/bench_cpu_engines.py --onnx-python VENV/bin/python --openvino-python VENV2/bin/python

- project: the encoder this project serves (its default CPU engine: the transformer through
  OpenVINO in fp32, engine/openvino_runtime.py; token-budget passes);
- project-onednn: the same encoder with cpu_engine onednn (torch, linear layers through packed
  oneDNN, passes side by side), its engine until 2026-11-30;
- st-torch: sentence-transformers' own encode (torch, fp32);
- st-onnx / st-openvino: sentence-transformers' ONNX Runtime and OpenVINO backends (exported from the
  same local model at first load: that time and the files' size are reported).
sentence-transformers' ONNX and OpenVINO backends need optimum-onnx / optimum-intel, which pin
transformers < 5.6 (this project pins 5.23) and each a different optimum: each runs in an
environment of its own (pip install "transformers<5.6" "sentence-transformers[onnx]", and
[openvino] in another). Every engine runs in its own process, one after another, rounds alternating.
Workloads (all-MiniLM-L6-v2 by default, the demo model): a lone query (p50 latency of 50 calls),
30 and 64 queries in one call, 32 passages of ~200 tokens in one call (texts/s, best of 3 calls).
Every engine's vectors are compared with st-torch's (cosine). Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = "the model learns patterns from examples while markets set prices by supply and demand".split()
ENGINES = ("project", "project-onednn", "st-torch", "st-onnx", "st-openvino")
OTHER_ENVIRONMENTS = {"st-onnx": "onnx_python", "st-openvino": "openvino_python"}  # engine -> its --*-python


def texts() -> dict[str, list[str]]:
    rng = random.Random(0)
    queries = [" ".join(rng.choices(WORDS, k=rng.randint(6, 16))) for _ in range(64)]
    passages = [" ".join(rng.choices(WORDS, k=rng.randint(150, 250))) for _ in range(32)]
    return {"1 query": queries[:1], "30 queries": queries[:30], "64 queries": queries, "32 passages": passages}


def load(engine: str, model_dir: Path):
    """(encode(list[str]) -> (n, D) unit vectors, seconds to load, files written at load)."""
    started = time.perf_counter()
    if engine.startswith("project"):
        from nvembed_triton.engine.encoders import load_encoder
        from nvembed_triton.protocol.options import TextOptions
        from nvembed_triton.settings import EncoderSettings

        cpu_engine = "onednn" if engine == "project-onednn" else "openvino"
        parameters = {"model_dir": str(model_dir), "device": "cpu", "cpu_engine": cpu_engine}
        encoder = load_encoder(EncoderSettings.from_parameters(parameters))
        return (lambda batch: encoder.encode(batch, TextOptions.each(len(batch))).embeddings), time.perf_counter() - started, 0
    from sentence_transformers import SentenceTransformer

    backend = {"st-torch": "torch", "st-onnx": "onnx", "st-openvino": "openvino"}[engine]
    before = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    model = SentenceTransformer(str(model_dir), device="cpu", backend=backend)
    if backend != "torch":
        model.save_pretrained(str(model_dir))  # the export kept beside the model, as a user would
    written = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file()) - before
    encode = lambda batch: model.encode(batch, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)  # noqa: E731
    return encode, time.perf_counter() - started, written


def worker(engine: str, model_dir: Path, out: Path) -> None:
    import numpy as np

    encode, load_s, written = load(engine, model_dir)
    result = {"engine": engine, "load_s": load_s, "written_bytes": written, "workloads": {}, "vectors": {}}
    for name, batch in texts().items():
        for _ in range(3):
            encode(batch)  # warm-up
        if len(batch) == 1:
            samples = []
            for _ in range(50):
                started = time.perf_counter()
                encode(batch)
                samples.append(time.perf_counter() - started)
            result["workloads"][name] = {
                "p50_ms": statistics.median(samples) * 1e3,
                "texts_per_s": 1 / statistics.median(samples),
            }
        else:
            best = min(timed(encode, batch) for _ in range(3))
            result["workloads"][name] = {"texts_per_s": len(batch) / best}
        result["vectors"][name] = np.asarray(encode(batch), dtype=np.float32).tolist()
    out.write_text(json.dumps(result))


def timed(encode, batch) -> float:
    started = time.perf_counter()
    encode(batch)
    return time.perf_counter() - started


def run_round(engine: str, python: str, model_dir: Path, scratch: Path) -> dict:
    if engine in OTHER_ENVIRONMENTS:  # a fresh copy: the export is measured every round
        copy = scratch / f"model-{engine}"
        shutil.rmtree(copy, ignore_errors=True)
        model_dir = Path(shutil.copytree(model_dir, copy))
    out = scratch / f"{engine}.json"
    command = [python, __file__, "--worker", engine, "--model-dir", str(model_dir), "--out", str(out)]
    finished = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if finished.returncode:
        raise SystemExit(f"{engine} failed:\n{finished.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help="default: the demo model (all-MiniLM-L6-v2)")
    parser.add_argument("--onnx-python", help="a Python with sentence-transformers[onnx] (transformers < 5.6)")
    parser.add_argument("--openvino-python", help="a Python with sentence-transformers[openvino] (transformers < 5.6)")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default="bench/results/cpu-engines.json")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.model_dir, args.out)
        return 0
    import numpy as np

    from nvembed_triton.launcher.serve import demo_model_dir

    model_dir = args.model_dir or demo_model_dir()
    engines = args.engines.split(",")
    for engine, option in OTHER_ENVIRONMENTS.items():
        if engine in engines and not getattr(args, option):
            parser.error(f"{engine} needs --{option.replace('_', '-')} (see the docstring)")
    scratch = Path(tempfile.mkdtemp(prefix="nvembed-cpu-engines-"))
    runs: dict[str, list[dict]] = {engine: [] for engine in engines}
    for number in range(args.rounds):
        for engine in engines if number % 2 == 0 else reversed(engines):
            python = getattr(args, OTHER_ENVIRONMENTS[engine]) if engine in OTHER_ENVIRONMENTS else sys.executable
            runs[engine].append(run_round(engine, python, model_dir, scratch))
            print(f"round {number + 1} {engine}: " + ", ".join(
                f"{name} {w['texts_per_s']:.1f}/s" for name, w in runs[engine][-1]["workloads"].items()), flush=True)  # fmt: skip
    reference = runs.get("st-torch", runs[engines[0]])[0]["vectors"]
    summary = {}
    for engine, rows in runs.items():
        summary[engine] = {name: statistics.median(row["workloads"][name]["texts_per_s"] for row in rows) for name in texts()}
        summary[engine]["1 query p50 ms"] = statistics.median(row["workloads"]["1 query"]["p50_ms"] for row in rows)
        summary[engine]["load s"] = statistics.median(row["load_s"] for row in rows)
        summary[engine]["written MB"] = rows[0]["written_bytes"] / 1e6
        summary[engine]["min cosine vs st-torch"] = min(
            float(np.min(np.sum(np.array(rows[0]["vectors"][name]) * np.array(reference[name]), axis=1))) for name in texts()
        )
    names = list(texts())
    print(
        "\n| engine | " + " | ".join(f"{n} (texts/s)" for n in names) + " | 1 query p50 ms | load s | written MB | min cosine |"
    )
    print("|---|" + "---|" * (len(names) + 4))
    for engine, row in summary.items():
        cells = " | ".join(f"{row[n]:.1f}" for n in names)
        print(f"| {engine} | {cells} | {row['1 query p50 ms']:.2f} | {row['load s']:.1f} | {row['written MB']:.0f} | "
              f"{row['min cosine vs st-torch']:.6f} |")  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"summary": summary, "rounds": args.rounds}, indent=2))
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
