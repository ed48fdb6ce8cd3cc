"""Full-size NV-Embed-v2 (7.85B parameters, random weights made on the GPU: no download) end to end
through tritonserver on one GPU, against the same code in-process, in one run: the GPU machines are
lent for minutes, so every phase is written to the JSON as it ends and a failure keeps what came
before. From the repository root, with nvidia-pytriton (tritonserver) installed:

    PYTHONPATH=src python bench/bench_gpu_server.py --tokenizer-dir DIR [--scratch /dev/shm/x] [--json PATH]

DIR holds the Mistral tokenizer files of a checkpoint (a tiny checkpoint's will do:
python -m nvembed_triton.testing.tiny_checkpoint DIR).
1. checkpoint: the published layout (config, tokenizer, fp16 safetensors shards with an index),
   transformers' initialisation run on the GPU, written to --scratch.
2. server, once with cuda_graphs off and once on, each started as serve.sh starts it (device cuda,
   dtype auto = fp16, max_batch_tokens auto): seconds to ready; a lone query's latency over gRPC
   with the seed contract (p50/p99 of --lone-queries sequential calls) against the floor of reading
   every weight once (weight bytes / --hbm-tbps); requests/s of single queries at 1/16/64 clients;
   tokens/s on mixed documents (16..2048 tokens, log-uniform) sent as requests of 8 by 16 clients.
3. in-process: the production encoder (NVEmbedEncoder: tokenisation, token-budget passes, copies
   back) on the same mixed documents in one encode call, which the server's tokens/s is held
   against (target >= 90%); a lone query's pass eagerly and from its CUDA graph.
4. fp8 (Hopper): every linear layer in float8 e4m3, per-row weight scales and per-token activation
   scales through torch._scaled_mm; cosine of the mixed documents' vectors against fp16, tokens/s.
Token ids come from real text (common words, one token each); counts from the model's tokenizer.
Prints a summary at the end; the JSON holds every number.
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
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import tritonclient.grpc as grpcclient
from bench_gpu import FULL_TEXT_CONFIG, build_model
from bench_latency import stage_ms, traces_of
from bench_latency import summary as latency_summary
from bench_plumbing import closed_loop
from safetensors.torch import save_file
from shared import log_uniform_lengths, request_inputs, text_of_tokens

from nvembed_triton.engine.checkpoint import TOKENIZER_FILE, WEIGHTS_INDEX, LatentAttentionSettings
from nvembed_triton.engine.nvembed_encoder import NVEmbedEncoder
from nvembed_triton.engine.nvembed_model import BACKBONE_PREFIX, HEAD_PREFIX
from nvembed_triton.engine.tokenization import NVEmbedTokenizer
from nvembed_triton.protocol.contract import (
    DOCUMENTS_INPUT,
    EMBEDDINGS_OUTPUT,
    PUBLIC_MODEL,
    QUERY_INPUT,
    RETRIEVAL_TASK,
    nvembed_query_instruction,
)
from nvembed_triton.protocol.options import TextOptions
from nvembed_triton.protocol.settings import BY_KEY, EncoderSettings
from nvembed_triton.serving.serve import parser as serve_parser
from nvembed_triton.serving.serve import plan, server_settings
from nvembed_triton.serving.server import ADMIN_KEY_GRPC_HEADER, TritonServer, free_port
from nvembed_triton.testing.tiny_checkpoint import CONFIG as TINY_CONFIG
from nvembed_triton.testing.tiny_checkpoint import SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG

GIB = 2**30
SHARD_BYTES = 5 * 10**9  # the published snapshot's shard size
CLIENTS = (1, 16, 64)
DOCS_PER_REQUEST = 8
DOCUMENT_CLIENTS = 16
FP8_MAX = 448.0  # largest float8 e4m3fn
STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:5.0f} s] {message}", file=sys.stderr, flush=True)


# ---- 1. checkpoint ----


def write_full_checkpoint(out: Path, tokenizer_dir: Path, device: torch.device, tiny: bool) -> dict:
    """The published layout with random weights (--tiny: the test network's shape, to check this
    script on a CPU); returns its size and the seconds it took."""
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
    model = build_model(text_config, LatentAttentionSettings.from_config(latent_config), device, torch.float16)
    state = {BACKBONE_PREFIX + n: t for n, t in model.backbone.state_dict().items()}
    state.update({HEAD_PREFIX + n: t for n, t in model.head.state_dict().items()})
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
    parameters = sum(t.numel() for t in state.values())
    del model, state
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"seconds": time.perf_counter() - started, "bytes": total, "parameters": parameters, "shards": len(shards)}


# ---- 2. through the server ----


def start_settings(model_dir: Path, scratch: Path, cuda_graphs: bool, device: str):
    environ = {**os.environ, "TRITON_GRPC_PORT": str(free_port()), "TRITON_HTTP_PORT": str(free_port()),
               "TRITON_METRICS_PORT": str(free_port())}  # fmt: skip
    plan_ = plan(serve_parser().parse_args(["--model-dir", str(model_dir), "--device", device]), environ)
    run_dir = scratch / f"run-graphs-{'on' if cuda_graphs else 'off'}"
    settings = server_settings(plan_, run_dir, environ)
    graphs = {BY_KEY["cuda_graphs"].variable: "on" if cuda_graphs else "off"}
    (run_dir / "trace").mkdir(parents=True, exist_ok=True)
    trace_file = run_dir / "trace" / "trace.json"  # the lone queries' stages (bench_latency.py); off after them
    return dataclasses.replace(settings, environment={**settings.environment, **graphs}, trace_file=trace_file)


def percentiles(samples_ms: list[float]) -> dict:
    ordered = sorted(samples_ms)
    at = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]  # noqa: E731
    return {"p50_ms": at(0.5), "p90_ms": at(0.9), "p99_ms": at(0.99), "mean_ms": statistics.fmean(ordered), "n": len(ordered)}


WARM_UP_QUERIES = 20  # past each public instance's first query (the stub's first request is slower)


def lone_query_latency(settings, queries: list[str], count: int, record) -> None:
    """Sequential single-query calls, as the seed's client makes them; then Triton's trace of them,
    stage by stage (bench_latency.py), and tracing off for what follows."""
    url = settings.grpc_url
    with grpcclient.InferenceServerClient(url) as client:
        for query in queries[:WARM_UP_QUERIES]:
            client.infer(PUBLIC_MODEL, request_inputs(QUERY_INPUT, [query]))
        samples = []
        for i in range(count):
            started = time.perf_counter()
            result = client.infer(PUBLIC_MODEL, request_inputs(QUERY_INPUT, [queries[i % len(queries)]]))
            samples.append((time.perf_counter() - started) * 1e3)
            assert np.isfinite(result.as_numpy(EMBEDDINGS_OUTPUT)).all()
        client.update_trace_settings(settings={"trace_level": ["OFF"]}, headers={ADMIN_KEY_GRPC_HEADER: settings.admin_key})
    record("lone_query", percentiles(samples))
    traces = traces_of(settings.trace_file, WARM_UP_QUERIES + count)[WARM_UP_QUERIES:]
    record("lone_query_stages", latency_summary([stage_ms(t, c) for t, c in zip(traces, samples, strict=True)]))


async def send_documents(url: str, texts: list[str]) -> tuple[float, np.ndarray]:
    """Every text in requests of DOCS_PER_REQUEST, DOCUMENT_CLIENTS at a time: (seconds, vectors)."""
    from tritonclient.grpc import aio

    starts = list(range(0, len(texts), DOCS_PER_REQUEST))
    vectors: list[np.ndarray | None] = [None] * len(starts)
    pending = iter(enumerate(starts))

    async def caller(client) -> None:
        for index, start in pending:
            result = await client.infer(PUBLIC_MODEL, request_inputs(DOCUMENTS_INPUT, texts[start : start + DOCS_PER_REQUEST]))
            vectors[index] = result.as_numpy(EMBEDDINGS_OUTPUT).reshape(-1, result.as_numpy(EMBEDDINGS_OUTPUT).shape[-1])

    async with aio.InferenceServerClient(url) as client:
        started = time.perf_counter()
        await asyncio.gather(*(caller(client) for _ in range(DOCUMENT_CLIENTS)))
        seconds = time.perf_counter() - started
    return seconds, np.concatenate(vectors)


def through_server(model_dir: Path, scratch: Path, cuda_graphs: bool, work: dict, args, record) -> None:
    settings = start_settings(model_dir, scratch, cuda_graphs, args.device)
    started = time.perf_counter()
    with TritonServer(settings):
        record("ready_s", time.perf_counter() - started)
        if args.device == "cuda":
            record("gpu_memory_used_gib", (lambda free, total: (total - free) / GIB)(*torch.cuda.mem_get_info()))
        log(f"server (cuda_graphs {'on' if cuda_graphs else 'off'}) ready")
        lone_query_latency(settings, work["queries"], args.lone_queries, record)
        log(f"lone query {server_results_line(record.results)}")
        asyncio.run(closed_loop(settings.grpc_url, work["queries"], 16, 2.0, PUBLIC_MODEL))  # warm-up
        rows = []
        for clients in CLIENTS:
            done = asyncio.run(closed_loop(settings.grpc_url, work["queries"], clients, args.seconds, PUBLIC_MODEL))
            rows.append({"clients": clients, "requests_per_s": done / args.seconds})
            log(f"{clients} clients: {rows[-1]['requests_per_s']:.0f} requests/s")
        record("queries", rows)
        if args.queries_only:
            return
        asyncio.run(send_documents(settings.grpc_url, work["documents"][:64]))  # warm-up
        runs = []
        for _ in range(args.repeats):
            seconds, vectors = asyncio.run(send_documents(settings.grpc_url, work["documents"]))
            runs.append(work["document_tokens"] / seconds)
        record("documents_tokens_per_s", statistics.median(runs))
        record("documents_runs", runs)
        work[f"server vectors graphs {'on' if cuda_graphs else 'off'}"] = vectors
        log(f"documents: {statistics.median(runs):.0f} tokens/s")


def server_results_line(results: dict) -> str:
    lone = results.get("lone_query", {})
    return f"p50 {lone.get('p50_ms', float('nan')):.2f} ms, p99 {lone.get('p99_ms', float('nan')):.2f} ms"


# ---- 3. in-process ----


def timed_encode(encoder: NVEmbedEncoder, texts: list[str], repeats: int) -> tuple[list[float], np.ndarray]:
    runs, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = encoder.encode(texts, TextOptions.each(len(texts)))
        runs.append(time.perf_counter() - started)
    return runs, result.embeddings


def lone_pass_ms(encoder: NVEmbedEncoder, query: str, count: int) -> dict:
    tokenized = encoder.tokenizer.encode([query], [nvembed_query_instruction(RETRIEVAL_TASK)])
    for _ in range(5):
        encoder.embed_tokenized(tokenized)
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        encoder.embed_tokenized(tokenized)
        samples.append((time.perf_counter() - started) * 1e3)
    return {**percentiles(samples), "tokens": len(tokenized[0].ids)}


def lone_pass_gpu_ms(encoder: NVEmbedEncoder, query: str, count: int) -> dict:
    """GPU time of a lone query's pass (copies in, the pass or its graph, copy back), from CUDA events
    around it: what the wall time of lone_pass_ms spends on the device."""
    tokenized = encoder.tokenizer.encode([query], [nvembed_query_instruction(RETRIEVAL_TASK)])
    samples = []
    for _ in range(count):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        encoder.embed_tokenized(tokenized)
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop))
    return percentiles(samples)


def lone_pass_kernels(encoder: NVEmbedEncoder, query: str, passes: int = 10, top: int = 12) -> dict:
    """The eager pass's kernels under torch.profiler: count and device ms per pass, and the `top`
    kernels by device time (a graph replays the same kernels, without the launches between them)."""
    from torch.profiler import ProfilerActivity, profile

    tokenized = encoder.tokenizer.encode([query], [nvembed_query_instruction(RETRIEVAL_TASK)])
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        for _ in range(passes):
            encoder.embed_tokenized(tokenized)
        torch.cuda.synchronize()
    kernels = [e for e in profiler.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    device_us = lambda e: getattr(e, "self_device_time_total", None) or e.self_cuda_time_total  # noqa: E731
    kernels.sort(key=device_us, reverse=True)
    return {
        "kernels_per_pass": sum(e.count for e in kernels) / passes,
        "device_ms_per_pass": sum(device_us(e) for e in kernels) / passes / 1e3,
        "top": [
            {"kernel": e.key[:120], "per_pass": e.count / passes, "ms_per_pass": device_us(e) / passes / 1e3}
            for e in kernels[:top]
        ],  # fmt: skip
    }


def in_process(model_dir: Path, work: dict, args, record) -> NVEmbedEncoder:
    dtype = "fp16" if args.device == "cuda" else "fp32"  # the server's dtype auto
    settings = EncoderSettings.from_parameters({"model_dir": str(model_dir), "device": args.device, "dtype": dtype})
    started = time.perf_counter()
    encoder = NVEmbedEncoder(settings)
    record("load_s", time.perf_counter() - started)
    record("graphs_captured", len(encoder.graphs) if encoder.graphs else 0)
    timed_encode(encoder, work["documents"][:64], 1)  # warm-up
    runs, vectors = timed_encode(encoder, work["documents"], args.repeats)
    work["in-process vectors"] = vectors
    record("documents_tokens_per_s", work["document_tokens"] / statistics.median(runs))
    log(f"in-process documents: {work['document_tokens'] / statistics.median(runs):.0f} tokens/s")
    query = work["queries"][0]
    if encoder.graphs:
        record("lone_pass_graph", lone_pass_ms(encoder, query, args.lone_queries))
        if args.device == "cuda":
            record("lone_pass_graph_gpu", lone_pass_gpu_ms(encoder, query, args.lone_queries))
    graphs, encoder.graphs = encoder.graphs, None
    record("lone_pass_eager", lone_pass_ms(encoder, query, args.lone_queries))
    if args.device == "cuda":
        record("lone_pass_eager_gpu", lone_pass_gpu_ms(encoder, query, args.lone_queries))
        record("lone_pass_eager_kernels", lone_pass_kernels(encoder, query))
    encoder.graphs = graphs
    return encoder


# ---- 4. fp8 ----


class Fp8Linear(torch.nn.Module):
    """y = x W^T (+ b) with W and x in float8 e4m3: W scaled per output row at load, x per token."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
        self.weight = (weight / scale).to(torch.float8_e4m3fn)  # (out, in), row-major
        self.weight_scale = scale.t().contiguous()  # (1, out)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        scale = rows.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
        quantized = (rows.float() / scale).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(quantized, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, out_dtype=torch.bfloat16)
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], -1)


def to_fp8(model: torch.nn.Module) -> int:
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and child.in_features % 16 == 0 and child.out_features % 16 == 0:
                setattr(parent, name, Fp8Linear(child))
                replaced += 1
    torch.cuda.empty_cache()
    return replaced


def fp8(encoder: NVEmbedEncoder, work: dict, args, record) -> None:
    encoder.graphs = None  # captured with the fp16 layers
    fp16_vectors = work["in-process vectors"]
    record("linear_layers_replaced", to_fp8(encoder.model))
    timed_encode(encoder, work["documents"][:64], 1)  # warm-up
    runs, vectors = timed_encode(encoder, work["documents"], args.repeats)
    cosines = np.sum(vectors * fp16_vectors, axis=1)
    record("documents_tokens_per_s", work["document_tokens"] / statistics.median(runs))
    record("cosine_vs_fp16", {"min": float(cosines.min()), "median": float(np.median(cosines)), "mean": float(cosines.mean())})
    log(f"fp8: {work['document_tokens'] / statistics.median(runs):.0f} tokens/s, cosine min {cosines.min():.5f}")


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


def run_phase(recorder: Recorder, name: str, function, *arguments):
    record = recorder.phase(name)
    try:
        return function(*arguments, record)
    except Exception as error:  # keep going: the next phase's numbers are worth having
        record("error", f"{type(error).__name__}: {error}")
        log(f"{name} FAILED: {traceback.format_exc()}")
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer-dir", type=Path, required=True)
    parser.add_argument("--scratch", type=Path, default=Path("/dev/shm/nvembed-gpu-bench"))
    parser.add_argument("--json", type=Path, default=Path("bench/results/gpu-server.json"))
    parser.add_argument("--documents", type=int, default=256, help="mixed documents (16..2048 tokens)")
    parser.add_argument("--lone-queries", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=6.0, help="per requests/s cell")
    parser.add_argument("--repeats", type=int, default=2, help="runs of the documents, median kept")
    parser.add_argument("--hbm-tbps", type=float, default=4.8, help="the GPU's memory bandwidth (H200: 4.8)")
    parser.add_argument("--phases", default="checkpoint,server-eager,server-graphs,in-process,fp8")
    parser.add_argument("--queries-only", action="store_true", help="in the server phases, skip the documents")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="the tiny network on the CPU: checks the script, measures nothing")
    args = parser.parse_args()
    args.device = "cpu" if args.tiny else "cuda"
    phases = args.phases.split(",")
    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (--tiny)"
    results = {"setup": {"gpu": gpu, "torch": torch.__version__,
                         "documents": args.documents, "seconds": args.seconds, "repeats": args.repeats}}  # fmt: skip
    recorder = Recorder(args.json, results)
    model_dir = args.scratch / "NV-Embed-v2-random"
    work = workload(args.tokenizer_dir, args)
    recorder.phase("setup")("document_tokens", work["document_tokens"])
    if "checkpoint" in phases:
        checkpoint = run_phase(recorder, "checkpoint", lambda record: [record(k, v) for k, v in
                               write_full_checkpoint(model_dir, args.tokenizer_dir, device, args.tiny).items()])  # fmt: skip
        if checkpoint is None:
            return 1
        weight_bytes = results["checkpoint"]["bytes"]
        recorder.phase("setup")("weight_read_floor_ms", weight_bytes / (args.hbm_tbps * 1e12) * 1e3)
        log(f"checkpoint written: {weight_bytes / GIB:.1f} GiB")
    for graphs in (False, True):
        if f"server-{'graphs' if graphs else 'eager'}" in phases:
            run_phase(recorder, f"server cuda_graphs {'on' if graphs else 'off'}", through_server, model_dir, args.scratch,
                      graphs, work, args)  # fmt: skip
    encoder = None
    if "in-process" in phases:
        encoder = run_phase(recorder, "in-process", in_process, model_dir, work, args)
    if encoder is not None and "fp8" in phases:
        run_phase(recorder, "fp8", fp8, encoder, work, args)
    for graphs in ("off", "on"):
        server = work.get(f"server vectors graphs {graphs}")
        if server is not None and "in-process vectors" in work:
            cosines = np.sum(server * work["in-process vectors"], axis=1)
            recorder.phase("faithfulness")(f"server graphs {graphs} vs in-process, min cosine", float(cosines.min()))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
