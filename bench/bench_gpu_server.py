"""The one-call GPU run: full-size NV-Embed-v2 (7.85B parameters, random weights made on the GPU: no
download) through tritonserver on one GPU, today's path and the new engine side by side in the same
call on the same card, then in-process measurements that say where the time goes. GPU machines are
lent for minutes, so every phase writes the JSON as it ends and a failure keeps what came before.
From the repository root, with nvidia-pytriton (tritonserver) installed:

    git archive COMMIT src | tar -x -C /tmp/before          # the baseline's package, before the run
    PYTHONPATH=src python bench/bench_gpu_server.py --tokenizer-dir DIR --before-src /tmp/before/src \\
        [--scratch /dev/shm/x] [--json PATH] [--phases ...]

DIR holds the Mistral tokenizer files of a checkpoint (a tiny checkpoint's will do:
python -m nvembed_triton.testing.tiny_checkpoint DIR). Phases, in order:
  checkpoint     the published layout (config, tokenizer, fp16 safetensors shards with an index),
                 transformers' initialisation run on the GPU, written to --scratch.
  server-before  --before-src's package served as its serve.sh serves it (dtype auto = fp16).
  server-after   this checkout's, with packed passes (auto), compiled layers and its pass log.
                 Each server: seconds to ready; a lone query's latency over gRPC with the seed
                 contract (p50/p99 of --lone-queries calls, and Triton's trace of them, stage by
                 stage) against the floor of reading every weight once; requests/s of single queries
                 at 1/16/64 clients; tokens/s on mixed documents (16..2048 tokens) in requests of 8
                 from 16 clients. After: the pass log at 64 clients (rows, GPU ms, what waited).
  in-process     this checkout's encoder: each graph bucket's replay timed by CUDA events around
                 the replay alone (and the weights it reads per ms: the achieved bandwidth); the
                 kernels of a lone query's eager pass and of its replay (torch.profiler); mixed
                 documents packed and padded (tokens/s, tokens computed per token).
  precision      fp32 against fp16 on the mixed documents (min cosine).
  fp8            FP8 linear layers (compiled): tokens/s, a lone pass, cosine against fp16.
--tiny runs the tiny network on the CPU: it checks the script (CI's smoke test), measures nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import tritonclient.grpc as grpcclient
from bench_latency import stage_ms, traces_of
from bench_latency import summary as latency_summary
from bench_plumbing import closed_loop
from bench_versions import package_copy
from safetensors.torch import save_file
from shared import log_uniform_lengths, request_inputs, text_of_tokens

from nvembed_triton.engine.checkpoint import TOKENIZER_FILE, WEIGHTS_INDEX, LatentAttentionSettings
from nvembed_triton.engine.cuda_graphs import all_buckets
from nvembed_triton.engine.encoders import load_encoder
from nvembed_triton.engine.fused_mistral import BACKBONE_PREFIX
from nvembed_triton.engine.nvembed_model import HEAD_PREFIX, LatentAttentionPooling
from nvembed_triton.engine.tokenization import NVEmbedTokenizer
from nvembed_triton.launcher.server import free_port
from nvembed_triton.protocol.contract import DOCUMENTS_INPUT, EMBEDDINGS_OUTPUT, QUERY_INPUT
from nvembed_triton.protocol.options import TextOptions
from nvembed_triton.settings import EncoderSettings
from nvembed_triton.testing.tiny_checkpoint import CONFIG as TINY_CONFIG
from nvembed_triton.testing.tiny_checkpoint import SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG, mistral_config

GIB = 2**30
SHARD_BYTES = 5 * 10**9  # the published snapshot's shard size
# The published text_config's architecture (docs/nv-embed-v2.md).
FULL_TEXT_CONFIG = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu", "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0, "max_position_embeddings": 32768, "sliding_window": 4096,
    "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
}  # fmt: skip
CLIENTS = (1, 16, 64)
DOCS_PER_REQUEST = 8
DOCUMENT_CLIENTS = 16
WARM_UP_QUERIES = 20  # the first requests of a fresh stub are slower
OLD_ADMIN_KEY_GRPC_HEADER = "triton-grpc-protocol-nvembed-admin-key"  # a baseline's, before its admin APIs closed
AFTER_SETTINGS = {"NVEMBED_PASSES": "auto", "NVEMBED_COMPILE": "on"}
STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:5.0f} s] {message}", file=sys.stderr, flush=True)


# ---- checkpoint ----


def write_full_checkpoint(out: Path, tokenizer_dir: Path, device: torch.device, tiny: bool, record) -> None:
    """The published layout with random weights (--tiny: the test network's shape)."""
    from transformers import MistralModel

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    text_config = {**TINY_CONFIG["text_config"], **({} if tiny else FULL_TEXT_CONFIG)}
    latent_config = TINY_CONFIG["latent_attention_config"] if tiny else {"model_type": "latent_attention"}  # published: defaults
    config = {**TINY_CONFIG, "hidden_size": text_config["hidden_size"], "text_config": text_config,
              "latent_attention_config": latent_config}  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer.model"):
        shutil.copyfile(tokenizer_dir / name, out / name)
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    (out / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # made in fp16 on the device: no float32 copy of 7B parameters
    try:
        with torch.device(device):
            backbone = MistralModel(mistral_config(text_config))  # transformers' init: normal(0, 0.02)
            head = LatentAttentionPooling(LatentAttentionSettings.from_config(latent_config))
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        head.latents.normal_()
    state = {BACKBONE_PREFIX + n: t for n, t in backbone.state_dict().items()}
    state.update({HEAD_PREFIX + n: t for n, t in head.state_dict().items()})
    shards: list[list[str]] = [[]]
    size = 0
    for name in state:  # in model order, as the published shards are
        if size >= SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += state[name].numel() * state[name].element_size()
    weight_map = {}
    for number, names in enumerate(shards, 1):
        filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: state[n].contiguous() for n in names}, out / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, filename))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / WEIGHTS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    for path in out.iterdir():
        path.chmod(0o644)
    record("seconds", time.perf_counter() - started)
    record("bytes", total)
    record("parameters", sum(t.numel() for t in state.values()))
    del backbone, head, state
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- the servers ----


@contextmanager
def served(model_dir: Path, run_dir: Path, device: str, source: Path | None, settings: dict[str, str], traced: int):
    """A server of this checkout's package, or of `source` (a package's src/, copied and served with
    this environment's libraries), started as serve.sh starts it; yields its ServerSettings."""
    run_dir.mkdir(parents=True, exist_ok=True)
    environ = {**os.environ, **settings, "NVEMBED_MODEL_DIR": str(model_dir), "NVEMBED_DEVICE": device,
               "BENCH_TRACED_REQUESTS": str(traced)}  # fmt: skip
    if source is not None:
        environ["PYTHONPATH"] = str(package_copy(source.parent, run_dir / "src"))
    command = [sys.executable, __file__, "--serve", str(run_dir)]
    with subprocess.Popen(command, env=environ, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as launcher:
        try:
            line = launcher.stdout.readline()
            if not line:
                raise RuntimeError(f"the server did not start; see {run_dir}")
            yield json.loads(line)
        finally:
            launcher.stdin.close()  # the launcher stops its server when its input ends
            launcher.wait(timeout=180)


def serve(run_dir: Path) -> None:
    """The launcher's side (--serve): the package on PYTHONPATH serves until this process's input ends."""
    from nvembed_triton.launcher.serve import parser, plan, server_settings
    from nvembed_triton.launcher.server import TritonServer

    environ = {**os.environ, "TRITON_GRPC_PORT": str(free_port()), "TRITON_HTTP_PORT": str(free_port()),
               "TRITON_METRICS_PORT": str(free_port())}  # fmt: skip
    plan_ = plan(parser().parse_args([]), environ)
    settings = server_settings(plan_, run_dir / "run", environ)
    (run_dir / "trace").mkdir(parents=True, exist_ok=True)
    settings = dataclasses.replace(settings, trace_file=run_dir / "trace" / "trace.json")
    if hasattr(settings, "trace_count"):  # only the lone queries are traced (tracing costs every request)
        settings = dataclasses.replace(settings, trace_count=int(os.environ["BENCH_TRACED_REQUESTS"]))
    started = time.perf_counter()
    with TritonServer(settings) as server:
        print(json.dumps({"url": settings.grpc_url, "model": plan_.name, "ready_s": time.perf_counter() - started,
                          "admin_key": getattr(settings, "admin_key", ""), "trace_file": str(settings.trace_file),
                          "metrics_url": settings.metrics_url, "log": str(server.log_path)}), flush=True)  # fmt: skip
        sys.stdin.read()
        server.kill()


def percentiles(samples_ms: list[float]) -> dict:
    ordered = sorted(samples_ms)
    at = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]  # noqa: E731
    return {"p50_ms": at(0.5), "p90_ms": at(0.9), "p99_ms": at(0.99), "mean_ms": statistics.fmean(ordered), "n": len(ordered)}


def lone_queries(server: dict, queries: list[str], count: int, record) -> None:
    """Sequential single-query calls, as the seed's client makes them; then Triton's trace of them,
    stage by stage (bench_latency.py), and tracing off for what follows."""
    outputs = [grpcclient.InferRequestedOutput(EMBEDDINGS_OUTPUT)]
    with grpcclient.InferenceServerClient(server["url"]) as client:
        for query in queries[:WARM_UP_QUERIES]:
            client.infer(server["model"], request_inputs(QUERY_INPUT, [query]), outputs=outputs)
        samples = []
        for i in range(count):
            started = time.perf_counter()
            result = client.infer(server["model"], request_inputs(QUERY_INPUT, [queries[i % len(queries)]]), outputs=outputs)
            samples.append((time.perf_counter() - started) * 1e3)
            assert np.isfinite(result.as_numpy(EMBEDDINGS_OUTPUT)).all()
        if server["admin_key"]:  # a baseline from before trace_count: tracing off through its admin key
            headers = {OLD_ADMIN_KEY_GRPC_HEADER: server["admin_key"]}
            client.update_trace_settings(settings={"trace_level": ["OFF"]}, headers=headers)
    record("lone_query", percentiles(samples))
    traces = traces_of(Path(server["trace_file"]), WARM_UP_QUERIES + count)[WARM_UP_QUERIES:]
    record("lone_query_stages", latency_summary([stage_ms(t, c) for t, c in zip(traces, samples, strict=True)]))


async def send_documents(url: str, model: str, texts: list[str]) -> tuple[float, np.ndarray]:
    """Every text in requests of DOCS_PER_REQUEST, DOCUMENT_CLIENTS at a time: (seconds, vectors)."""
    from tritonclient.grpc import aio

    starts = list(range(0, len(texts), DOCS_PER_REQUEST))
    vectors: list[np.ndarray | None] = [None] * len(starts)
    pending = iter(enumerate(starts))

    async def caller(client) -> None:
        for index, start in pending:
            result = await client.infer(model, request_inputs(DOCUMENTS_INPUT, texts[start : start + DOCS_PER_REQUEST]))
            vectors[index] = result.as_numpy(EMBEDDINGS_OUTPUT).reshape(-1, result.as_numpy(EMBEDDINGS_OUTPUT).shape[-1])

    async with aio.InferenceServerClient(url) as client:
        started = time.perf_counter()
        await asyncio.gather(*(caller(client) for _ in range(DOCUMENT_CLIENTS)))
        seconds = time.perf_counter() - started
    return seconds, np.concatenate(vectors)


def pass_log_summary(path: Path, since: float) -> dict:
    """What the passes written after `since` held and took (the pass log's lines)."""
    if not path.is_file():
        return {}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line]
    passes = [p for p in lines if p["time"] >= since]
    if not passes:
        return {}
    median = lambda key: statistics.median(p[key] for p in passes if p[key] is not None)  # noqa: E731
    timed = [p for p in passes if p["device_ms"] is not None]
    return {
        "passes": len(passes), "rows_p50": median("rows"), "tokens_p50": median("tokens"),
        "device_ms_p50": statistics.median(p["device_ms"] for p in timed) if timed else None,
        "wall_ms_p50": median("wall_ms"), "waiting_p50": median("waiting"), "requests_per_batch_p50": median("requests"),
        "paths": {path: sum(p["path"] == path for p in passes) for path in {p["path"] for p in passes}},
        "device_busy_share": sum(p["device_ms"] for p in timed) / 1e3 / (passes[-1]["time"] - passes[0]["time"] + 1e-9)
        if len(timed) > 1 else None,
    }  # fmt: skip


def through_server(name: str, model_dir: Path, work: dict, args, record) -> None:
    after = name == "after"
    source = None if after else args.before_src
    if not after and source is None:
        raise ValueError("--before-src is needed for the baseline server")
    pass_log = args.scratch / "pass-log.jsonl"
    settings = {**AFTER_SETTINGS, "NVEMBED_PASS_LOG": str(pass_log)} if after else {}
    traced = WARM_UP_QUERIES + args.lone_queries
    with served(model_dir, args.scratch / f"server-{name}", args.device, source, settings, traced) as server:
        record("ready_s", server["ready_s"])
        if args.device == "cuda":
            record("gpu_memory_used_gib", (lambda free, total: (total - free) / GIB)(*torch.cuda.mem_get_info()))
        lone_queries(server, work["queries"], args.lone_queries, record)
        log(f"{name}: lone query p50 {record.results['lone_query']['p50_ms']:.2f} ms")
        asyncio.run(closed_loop(server["url"], work["queries"], 16, 2.0, server["model"]))  # warm-up
        rows = []
        for clients in CLIENTS:
            since = time.time()
            done = asyncio.run(closed_loop(server["url"], work["queries"], clients, args.seconds, server["model"]))
            rows.append({"clients": clients, "requests_per_s": done / args.seconds})
            if after:
                rows[-1]["passes"] = pass_log_summary(pass_log, since)
            log(f"{name}: {clients} clients {rows[-1]['requests_per_s']:.0f} requests/s")
        record("queries", rows)
        asyncio.run(send_documents(server["url"], server["model"], work["documents"][:64]))  # warm-up
        runs = []
        since = time.time()
        for _ in range(args.repeats):
            seconds, vectors = asyncio.run(send_documents(server["url"], server["model"], work["documents"]))
            runs.append(work["document_tokens"] / seconds)
        record("documents_tokens_per_s", statistics.median(runs))
        record("documents_runs", runs)
        if after:
            record("documents_passes", pass_log_summary(pass_log, since))
        work[f"server {name} vectors"] = vectors
        log(f"{name}: documents {statistics.median(runs):.0f} tokens/s")


# ---- in-process ----


def encoder_for(model_dir: Path, args, **settings: str):
    dtype = "fp16" if args.device == "cuda" else "fp32"  # the server's dtype auto
    parameters = {"model_dir": str(model_dir), "device": args.device, "dtype": dtype, **settings}
    return load_encoder(EncoderSettings.from_parameters(parameters))


def timed_encode(encoder, texts: list[str], repeats: int):
    runs, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = encoder.encode(texts, TextOptions.each(len(texts)))
        runs.append(time.perf_counter() - started)
    return runs, result


def weight_bytes_per_pass(model) -> int:
    """What every pass reads: the backbone's layers and norms, the head but the latents' keys and
    values (computed at load) and the latents; the embedding table is read a row per token."""
    skipped = {"head.latents", "head.cross_attend_blocks.0.fn.to_kv.weight", "backbone.embed_tokens.weight"}
    parameters = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if name not in skipped)
    buffers = sum(b.numel() * b.element_size() for name, b in model.named_buffers() if name.startswith("backbone.layers"))
    return parameters + buffers


def bucket_replays(encoder, repeats: int) -> dict:
    """Each graph bucket's replay alone, timed by CUDA events: p50 GPU ms."""
    out = {}
    rng = random.Random(0)
    for rows, length in sorted(all_buckets()):
        texts = [text_of_tokens(rng, max(1, length - 4)) for _ in range(rows)]
        tokenized = encoder.tokenizer.encode(texts, [""] * rows)
        samples = [encoder.embed_tokenized(tokenized)[1].device_ms for _ in range(repeats)]
        out[f"{rows}x{length}"] = statistics.median(samples)
    return out


def kernels_of(call, passes: int = 5) -> dict:
    """The CUDA kernels `call` launches (torch.profiler): count and device ms per call, top 12."""
    from torch.profiler import ProfilerActivity, profile

    call()
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        for _ in range(passes):
            call()
        torch.cuda.synchronize()
    kernels = [e for e in profiler.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    device_us = lambda e: getattr(e, "self_device_time_total", None) or e.self_cuda_time_total  # noqa: E731
    kernels.sort(key=device_us, reverse=True)
    return {"kernels_per_pass": sum(e.count for e in kernels) / passes,
            "device_ms_per_pass": sum(device_us(e) for e in kernels) / passes / 1e3,
            "top": [{"kernel": e.key[:120], "per_pass": e.count / passes, "ms_per_pass": device_us(e) / passes / 1e3}
                    for e in kernels[:12]]}  # fmt: skip


def in_process(model_dir: Path, work: dict, args, record) -> None:
    started = time.perf_counter()
    encoder = encoder_for(model_dir, args, compile="on")
    record("load_s", time.perf_counter() - started)
    record("runs_on", encoder.runs_on)
    weights = weight_bytes_per_pass(encoder.model)
    record("weight_bytes_per_pass", weights)
    query = encoder.tokenizer.encode([work["queries"][0]], [encoder.default_instruction("query")])
    if encoder.graphs is not None:
        replays = bucket_replays(encoder, args.lone_queries // 4 or 1)
        record("graph_replay_device_ms", replays)
        lone = [encoder.embed_tokenized(query)[1] for _ in range(args.lone_queries)]
        replay_ms = statistics.median(r.device_ms for r in lone)
        record("lone_pass", {"graph replay device ms p50": replay_ms, "wall ms p50": statistics.median(r.wall_ms for r in lone),
                             "weights read TB/s": weights / replay_ms / 1e9, "path": lone[0].path})  # fmt: skip
        record("lone_replay_kernels", kernels_of(lambda: encoder.embed_tokenized(query)))
    graphs, encoder.graphs = encoder.graphs, None
    eager = [encoder.embed_tokenized(query)[1] for _ in range(max(5, args.lone_queries // 4))]
    record("lone_pass_eager", {"wall ms p50": statistics.median(r.wall_ms for r in eager), "path": eager[0].path,
                               "device ms p50": statistics.median(r.device_ms for r in eager) if eager[0].device_ms else None})
    if args.device == "cuda":
        record("lone_pass_eager_kernels", kernels_of(lambda: encoder.embed_tokenized(query)))
    encoder.graphs = graphs
    documents = {}
    for packed in (True, False):
        encoder.packed = packed
        timed_encode(encoder, work["documents"][:64], 1)  # warm-up
        runs, result = timed_encode(encoder, work["documents"], args.repeats)
        name = "packed" if packed else "padded"
        documents[name] = {"tokens_per_s": work["document_tokens"] / statistics.median(runs),
                           "computed_per_token": result.padded_tokens / int(result.token_counts.sum()), "passes": result.passes}
        work[f"in-process {name} vectors"] = result.embeddings
        log(f"in-process {name}: {documents[name]['tokens_per_s']:.0f} tokens/s")
    record("documents", documents)
    cosines = np.sum(work["in-process packed vectors"] * work["in-process padded vectors"], axis=1)
    record("packed vs padded, min cosine", float(cosines.min()))
    encoder = None  # its GPU memory goes back before the next phase loads another
    if args.device == "cuda":
        torch.cuda.empty_cache()


def precision(model_dir: Path, work: dict, args, record) -> None:
    encoder = encoder_for(model_dir, args, dtype="fp32")
    vectors = encoder.encode(work["documents"], TextOptions.each(len(work["documents"]))).embeddings
    for name in ("in-process packed vectors", "server after vectors", "server before vectors"):
        if name in work:
            record(f"fp32 vs {name.replace(' vectors', '')}, min cosine", float(np.sum(vectors * work[name], axis=1).min()))
    del encoder
    if args.device == "cuda":
        torch.cuda.empty_cache()


def fp8(model_dir: Path, work: dict, args, record) -> None:
    encoder = encoder_for(model_dir, args, fp8="on", compile="on")
    record("runs_on", encoder.runs_on)
    timed_encode(encoder, work["documents"][:64], 1)
    runs, result = timed_encode(encoder, work["documents"], args.repeats)
    record("documents_tokens_per_s", work["document_tokens"] / statistics.median(runs))
    if "in-process packed vectors" in work:
        cosines = np.sum(result.embeddings * work["in-process packed vectors"], axis=1)
        record("cosine_vs_fp16", {"min": float(cosines.min()), "median": float(np.median(cosines))})
    query = encoder.tokenizer.encode([work["queries"][0]], [encoder.default_instruction("query")])
    lone = [encoder.embed_tokenized(query)[1] for _ in range(args.lone_queries)]
    record("lone_pass", {"wall ms p50": statistics.median(r.wall_ms for r in lone), "path": lone[0].path,
                         "device ms p50": statistics.median(r.device_ms for r in lone) if lone[0].device_ms else None})
    del encoder


# ---- the run ----


class Recorder:
    """results[phase][key] = value, written to the JSON at every call."""

    def __init__(self, path: Path, results: dict):
        self.path, self.all = path, results

    def phase(self, name: str):
        self.all.setdefault(name, {})

        def record(key: str, value) -> None:
            self.all[name][key] = value
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.all, indent=2))

        record.results = self.all[name]
        return record


def workload(tokenizer_dir: Path, args) -> dict:
    rng = random.Random(args.seed)
    documents = [text_of_tokens(rng, n) for n in log_uniform_lengths(rng, args.documents)]
    queries = [text_of_tokens(rng, rng.randint(6, 24)) for _ in range(512)]
    tokenizer = NVEmbedTokenizer(tokenizer_dir / TOKENIZER_FILE, 32768)
    tokens = sum(len(t.ids) for t in tokenizer.encode(documents, [""] * len(documents)))
    return {"documents": documents, "queries": queries, "document_tokens": tokens}


def run_phase(recorder: Recorder, name: str, function, *arguments) -> bool:
    record = recorder.phase(name)
    started = time.perf_counter()
    try:
        function(*arguments, record)
        return True
    except Exception as error:  # keep going: the next phase's numbers are worth having
        record("error", f"{type(error).__name__}: {error}")
        log(f"{name} FAILED: {traceback.format_exc()}")
        return False
    finally:
        record("phase_s", time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer-dir", type=Path)
    parser.add_argument("--before-src", type=Path, help="the baseline's package (a src/ folder) for server-before")
    parser.add_argument("--scratch", type=Path, default=Path("/dev/shm/nvembed-gpu-bench"))
    parser.add_argument("--json", type=Path, default=Path("bench/results/gpu-server.json"))
    parser.add_argument("--documents", type=int, default=256, help="mixed documents (16..2048 tokens)")
    parser.add_argument("--lone-queries", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=6.0, help="per requests/s cell")
    parser.add_argument("--repeats", type=int, default=2, help="runs of the documents, median kept")
    parser.add_argument("--hbm-tbps", type=float, default=4.8, help="the GPU's memory bandwidth (H200: 4.8, H100: 3.35)")
    parser.add_argument("--phases", default="checkpoint,server-before,server-after,in-process,precision,fp8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="the tiny network on the CPU: checks the script, measures nothing")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return 0
    if args.tokenizer_dir is None:
        parser.error("--tokenizer-dir is required")
    args.device = "cpu" if args.tiny else "cuda"
    phases = args.phases.split(",")
    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (--tiny)"
    results = {"setup": {"gpu": gpu, "torch": torch.__version__, "documents": args.documents, "seconds": args.seconds,
                         "repeats": args.repeats, "phases": phases, "load": os.getloadavg()}}  # fmt: skip
    recorder = Recorder(args.json, results)
    model_dir = args.scratch / "NV-Embed-v2-random"
    work = workload(args.tokenizer_dir, args)
    recorder.phase("setup")("document_tokens", work["document_tokens"])
    if "checkpoint" in phases:
        if not run_phase(recorder, "checkpoint", write_full_checkpoint, model_dir, args.tokenizer_dir, device, args.tiny):
            return 1
        weight_bytes = results["checkpoint"]["bytes"]
        recorder.phase("setup")("checkpoint_read_floor_ms", weight_bytes / (args.hbm_tbps * 1e12) * 1e3)
        log(f"checkpoint written: {weight_bytes / GIB:.1f} GiB")
    for name in ("before", "after"):
        if f"server-{name}" in phases:
            run_phase(recorder, f"server {name}", through_server, name, model_dir, work, args)
    for name, function in (("in-process", in_process), ("precision", precision), ("fp8", fp8)):
        if name in phases:
            run_phase(recorder, name, function, model_dir, work, args)
    server_vectors = [work.get(f"server {name} vectors") for name in ("before", "after")]
    if all(v is not None for v in server_vectors):
        cosines = np.sum(server_vectors[0] * server_vectors[1], axis=1)
        recorder.phase("faithfulness")("server after vs before, min cosine", float(cosines.min()))
    if weights := results.get("in-process", {}).get("weight_bytes_per_pass"):
        recorder.phase("setup")("weight_read_floor_ms", weights / (args.hbm_tbps * 1e12) * 1e3)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
