"""Soak: one server started through serve.sh (OpenAI API on) under mixed load for --minutes, every
answer checked, and the memory of every process of the server sampled as it goes.

    .venv/bin/python bench/bench_soak.py [--minutes 30] [--clients 16] [--warmup-minutes 5] [--sample-s 30]
        [--model-dir DIR] [--env LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2] [--oversized 5]

Load, seeded per client: gRPC `query` (one text) and `documents` (1-64 texts) through tritonclient,
and POST /v1/embeddings (1-64 texts) with encoding_format float and base64; texts of 1-2000
characters, some of them not ASCII. Every answer must have one finite unit vector per text; a few
fixed texts mixed into requests must come back as their first answer did (cosine >= 0.99999).

Memory: every --sample-s seconds, RssAnon and RssShmem of each process under the serve.sh pid (the
launcher, an OpenAI front if it is its own process, tritonserver, the stubs grouped by model), and
the tmpfs blocks of the /dev/shm files they map, counted once. Total = every process's anonymous
memory + those /dev/shm blocks (RssShmem is left out of it: each process that maps a page counts it,
tritonserver once per mapping of a region it has grown). The slope is a least-squares fit of the
samples after --warmup-minutes (of the tritonserver that ran longest, if the supervisor restarted
one). --oversized N first sends N requests of 18 MiB that the server refuses (max_request_bytes)
and samples what they left behind. --env passes settings to serve.sh, e.g. to compare mallocs.
Prints tables; writes JSON (bench/results/soak-<time>.json). Exits 1 if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import numpy as np
import tritonclient.grpc as grpcclient
from shared import model_dir_or_tiny, write_json
from tritonclient.grpc import aio
from tritonclient.utils import InferenceServerException

from nvembed_triton.launcher.server import free_port

ROOT = Path(__file__).resolve().parents[1]
MODEL = "nv-embed-v2"
KINDS = ("grpc_query", "grpc_documents", "openai_float", "openai_base64")
WORDS = ("bread flour yeast water salt oven crust dough markets prices supply demand model learns patterns from examples "
         "pain farine levure eau sel Brot Mehl Hefe 面包 面粉 酵母 хлеб мука дрожжи 🍞 🥖 naïve café").split()  # fmt: skip
FIXED_TEXTS = (
    "What is the capital of France?",
    "Le pain est fait de farine, d'eau, de sel et de levure; 面包 🍞.",
    " ".join(random.Random(7).choice(WORDS) for _ in range(300))[:1900],
)
FIXED_SHARE = 0.2  # of requests carrying one fixed text
MIN_COSINE = 0.99999
REQUEST_TIMEOUT_S = 300.0
OVERSIZED = ["y" * (9 * 2**20)] * 2  # 18 MiB of text: above the shipped max_request_bytes (16 MiB)
OVERSIZED_SETTLE_S = 15  # allocators give freed memory back lazily (jemalloc's dirty pages decay over 10 s)


# --- the server's processes and their memory ----------------------------------------------------


def process_tree(root: int) -> list[int]:
    """root and all its descendants, from every process's parent pid: children started by any
    thread (Triton starts stubs from its loading threads) are found."""
    children = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                children[int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])].append(int(entry.name))
            except (OSError, IndexError, ValueError):  # exited meanwhile
                pass
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children[pid])
    return tree


def role(pid: int, launcher: int) -> str:
    """The group a process is reported in."""
    args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    if pid == launcher:
        return "launcher (serve.sh)"
    if args[0].endswith("triton_python_backend_stub") and len(args) > 1:
        return f"stubs {Path(args[1]).parent.parent.name}"  # args[1]: .../<model>/<version>/model.py
    comm = Path(f"/proc/{pid}/comm").read_text().strip()
    if comm == "tritonserver":
        return "tritonserver"
    return "openai front" if "openai" in " ".join(args) else f"other {comm}"


def status_kib(pid: int) -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {key: int(fields.get(key, "0 kB").split()[0]) for key in ("RssAnon", "RssShmem")}


def shm_files(pid: int) -> set[str]:
    mapped = (line.split(maxsplit=5) for line in Path(f"/proc/{pid}/maps").read_text().splitlines())
    return {fields[5] for fields in mapped if len(fields) == 6 and fields[5].startswith("/dev/shm/")}


def memory_sample(launcher: int) -> dict:
    groups: dict[str, dict] = {}
    files: set[str] = set()
    servers = []
    for pid in process_tree(launcher):
        try:
            name, kib = role(pid, launcher), status_kib(pid)
            files |= shm_files(pid)
        except (OSError, IndexError):  # exited meanwhile, or a zombie (no command line)
            continue
        if name == "tritonserver":
            servers.append(pid)
        group = groups.setdefault(name, {"processes": 0, "anon_mb": 0.0, "shmem_mb": 0.0, "max_anon_mb": 0.0})
        group["processes"] += 1
        group["anon_mb"] += kib["RssAnon"] / 1024
        group["shmem_mb"] += kib["RssShmem"] / 1024
        group["max_anon_mb"] = max(group["max_anon_mb"], kib["RssAnon"] / 1024)
    shm_mb = shm_apparent_mb = 0.0
    for path in files:
        try:
            stat = os.stat(path)
        except OSError:  # unlinked: "(deleted)"
            continue
        shm_mb += stat.st_blocks * 512 / 2**20
        shm_apparent_mb += stat.st_size / 2**20
    anon = sum(g["anon_mb"] for g in groups.values())
    return {"groups": groups, "tritonserver_pids": servers, "shm_files": len(files), "shm_mb": shm_mb,
            "shm_apparent_mb": shm_apparent_mb, "total_mb": anon + shm_mb, "loadavg_1m": os.getloadavg()[0]}  # fmt: skip


def slope_mb_per_min(samples: list[dict], value) -> float | None:
    """Least-squares slope of value(sample) against the sample's minute."""
    if len(samples) < 2:
        return None
    xs, ys = [s["minute"] for s in samples], [value(s) for s in samples]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread if spread else None


# --- the load ------------------------------------------------------------------------------------


def random_text(rng: random.Random) -> str:
    length = rng.randint(1, 2000)
    words = []
    while sum(len(w) + 1 for w in words) < length:
        words.append(rng.choice(WORDS))
    return " ".join(words)[:length]


def next_request(rng: random.Random) -> tuple[str, list[str], int | None]:
    """(kind, texts, position of a fixed text or None)."""
    kind = rng.choice(KINDS)
    texts = [random_text(rng) for _ in range(1 if kind == "grpc_query" else rng.randint(1, 64))]
    fixed_at = None
    if rng.random() < FIXED_SHARE:
        fixed_at = rng.randrange(len(texts))
        texts[fixed_at] = rng.choice(FIXED_TEXTS)
    return kind, texts, fixed_at


class Checker:
    """Unit norm for every vector; a fixed text's vector equal to its first answer."""

    def __init__(self):
        self.first: dict[tuple[str, str], np.ndarray] = {}
        self.min_cosine = 1.0

    def problem(self, kind: str, texts: list[str], fixed_at: int | None, vectors: np.ndarray) -> str | None:
        if vectors.ndim != 2 or len(vectors) != len(texts):
            return "wrong shape"
        if not np.all(np.isfinite(vectors)) or np.max(np.abs(np.linalg.norm(vectors, axis=1) - 1)) > 1e-3:
            return "not unit norm"
        if fixed_at is None:
            return None
        key = ("query" if kind == "grpc_query" else "passage", texts[fixed_at])  # the query instruction changes it
        vector = vectors[fixed_at].astype(np.float64)
        first = self.first.setdefault(key, vector)
        cosine = float(vector @ first / (np.linalg.norm(vector) * np.linalg.norm(first)))
        self.min_cosine = min(self.min_cosine, cosine)
        return None if cosine >= MIN_COSINE else "differs from its first answer"


async def embed_grpc(client: aio.InferenceServerClient, kind: str, texts: list[str]) -> np.ndarray:
    name, shape = ("query", [1]) if kind == "grpc_query" else ("documents", [1, len(texts)])
    tensor = grpcclient.InferInput(name, shape, "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object).reshape(shape))
    result = await client.infer(MODEL, [tensor], client_timeout=REQUEST_TIMEOUT_S)
    return result.as_numpy("embeddings").reshape(len(texts), -1)


async def embed_openai(http: httpx.AsyncClient, kind: str, texts: list[str]) -> np.ndarray:
    encoding = kind.removeprefix("openai_")
    response = await http.post("/v1/embeddings", json={"model": MODEL, "input": texts, "encoding_format": encoding})
    if response.status_code != 200:
        raise RuntimeError(f"http {response.status_code}")
    data = sorted(response.json()["data"], key=lambda item: item["index"])
    if encoding == "base64":
        return np.stack([np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4") for item in data])
    return np.array([item["embedding"] for item in data], dtype=np.float32)


def failure_reason(error: Exception) -> str:
    if isinstance(error, InferenceServerException):
        return f"grpc {error.status()}"
    if isinstance(error, httpx.HTTPError):
        return f"http {type(error).__name__}"
    return str(error) if isinstance(error, RuntimeError) else type(error).__name__


async def client_loop(seed: int, deadline: float, grpc_client, http, checker: Checker, results: dict) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        kind, texts, fixed_at = next_request(rng)
        started = time.perf_counter()
        try:
            if kind.startswith("grpc"):
                vectors = await embed_grpc(grpc_client, kind, texts)
            else:
                vectors = await embed_openai(http, kind, texts)
            problem = checker.problem(kind, texts, fixed_at, vectors)
        except Exception as error:  # every failure is counted by its kind, and the soak goes on
            problem = failure_reason(error)
        if problem:
            results["failures"][f"{kind}: {problem}"] += 1
        else:
            results["latencies"][kind].append(time.perf_counter() - started)


async def send_oversized(grpc_url: str, count: int) -> list[str]:
    """What the server answered to each oversized request (a refusal naming max_request_bytes)."""
    answers = []
    async with aio.InferenceServerClient(grpc_url) as client:
        for _ in range(count):
            try:
                await embed_grpc(client, "grpc_documents", OVERSIZED)
                answers.append("accepted")
            except InferenceServerException as error:
                answers.append(error.message()[:120])
    return answers


async def soak(args, launcher: int, grpc_url: str, openai_url: str) -> dict:
    started = time.monotonic()
    samples = []
    results = {"latencies": defaultdict(list), "failures": Counter()}

    async def sample(label: str = "") -> None:
        memory = await asyncio.to_thread(memory_sample, launcher)  # reading /proc must not stall the clients
        samples.append({"minute": (time.monotonic() - started) / 60, "label": label, **memory})
        done, failed, s = sum(map(len, results["latencies"].values())), sum(results["failures"].values()), samples[-1]
        print(f"[{s['minute']:5.1f} min] {done} ok, {failed} failed; total {s['total_mb']:.0f} MB "
              f"(/dev/shm {s['shm_mb']:.0f} MB); load {s['loadavg_1m']:.1f} {label}", file=sys.stderr, flush=True)  # fmt: skip

    await sample("before load")
    oversized = []
    if args.oversized:
        oversized = await send_oversized(grpc_url, args.oversized)
        await asyncio.sleep(OVERSIZED_SETTLE_S)
        await sample(f"after {args.oversized} oversized requests")
    checker = Checker()
    deadline = time.monotonic() + args.minutes * 60
    async with (
        aio.InferenceServerClient(grpc_url) as grpc_client,
        httpx.AsyncClient(
            base_url=openai_url, timeout=REQUEST_TIMEOUT_S, limits=httpx.Limits(max_connections=args.clients)
        ) as http,
    ):
        clients = [asyncio.create_task(client_loop(args.seed * 1000 + i, deadline, grpc_client, http, checker, results))
                   for i in range(args.clients)]  # fmt: skip
        while True:
            due = started + 60 * samples[-1]["minute"] + args.sample_s
            await asyncio.wait(clients, timeout=max(0.1, due - time.monotonic()))
            if all(c.done() for c in clients):
                break
            if time.monotonic() >= due:
                await sample()
        await asyncio.gather(*clients)
    await sample()
    return {"samples": samples, "oversized_answers": oversized, "min_cosine_fixed_texts": checker.min_cosine,
            "fixed_texts_seen": len(checker.first), **results}  # fmt: skip


# --- the server ----------------------------------------------------------------------------------


def start_server(args, model_dir: Path, run_dir: Path) -> tuple[subprocess.Popen, str, str]:
    grpc_port, openai_port = free_port(), free_port()
    extra = dict(item.split("=", 1) for item in args.env)
    env = {**os.environ, "TRITON_GRPC_PORT": str(grpc_port), "TRITON_HTTP_PORT": str(free_port()),
           "TRITON_METRICS_PORT": str(free_port()), "NVEMBED_OPENAI_PORT": str(openai_port),
           "NVEMBED_MODEL_DIR": str(model_dir), "PYTHON": sys.executable, **extra}  # fmt: skip
    process = subprocess.Popen([str(ROOT / "serve.sh"), "--device", args.device, "--run-dir", str(run_dir)], env=env,
                               start_new_session=True)  # fmt: skip
    openai_url = f"http://127.0.0.1:{openai_port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{openai_url}/health", timeout=2) as response:
                if response.status == 200:
                    return process, f"127.0.0.1:{grpc_port}", openai_url
        except OSError:
            time.sleep(1)
    stop_server(process)
    raise SystemExit(f"the server did not become ready; its log: {run_dir / 'tritonserver.log'}")


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM drains; the whole session goes if that takes too long."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


# --- the report ----------------------------------------------------------------------------------


def summarise(run: dict, warmup_minutes: float) -> dict:
    latencies, samples = run.pop("latencies"), run["samples"]
    kinds = {}
    for kind in KINDS:
        ms = np.array(latencies.get(kind, [])) * 1000
        failed = sum(n for key, n in run["failures"].items() if key.startswith(kind + ":"))
        kinds[kind] = {"ok": len(ms), "failed": failed, "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
                       "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None}  # fmt: skip
    # The supervisor restarts a broken tritonserver and memory starts over: the slope is fitted to the
    # samples of the tritonserver that ran longest after the warm-up.
    restarts = sum(a["tritonserver_pids"] != b["tritonserver_pids"] for a, b in itertools.pairwise(samples))
    by_server = defaultdict(list)
    for s in samples:
        if s["minute"] >= warmup_minutes and not s["label"]:
            by_server[tuple(s["tritonserver_pids"])].append(s)
    settled = max(by_server.values(), key=len, default=[])
    groups = sorted({g for s in samples for g in s["groups"]})
    slopes = {g: slope_mb_per_min(settled, lambda s, g=g: s["groups"].get(g, {}).get("anon_mb", 0.0)) for g in groups}
    slopes["/dev/shm"] = slope_mb_per_min(settled, lambda s: s["shm_mb"])
    slopes["total"] = slope_mb_per_min(settled, lambda s: s["total_mb"])
    marks = {s["label"]: s for s in samples if s["label"]}  # before load, and after the oversized requests
    marks |= {"after warm-up": settled[0] if settled else None, "last": settled[-1] if settled else samples[-1]}
    return {"kinds": kinds, "failures": dict(run.pop("failures")), "tritonserver_restarts": restarts,
            "slopes_mb_per_min": slopes, "marks": marks, **run}  # fmt: skip


def table(summary: dict, minutes: float) -> str:
    lines = ["| kind | ok | failed | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    for kind, k in summary["kinds"].items():
        p50, p99 = (f"{k[key]:.0f}" if k[key] is not None else "-" for key in ("p50_ms", "p99_ms"))
        lines.append(f"| {kind} | {k['ok']} | {k['failed']} | {p50} | {p99} |")
    ok = sum(k["ok"] for k in summary["kinds"].values())
    lines.append(f"\n{ok / (minutes * 60):.1f} requests/s answered correctly; fixed texts: min cosine "
                 f"{summary['min_cosine_fixed_texts']:.7f} over {summary['fixed_texts_seen']} texts")  # fmt: skip
    for reason, count in sorted(summary["failures"].items()):
        lines.append(f"failure: {reason}: {count}")
    if summary["tritonserver_restarts"]:
        lines.append(f"tritonserver was restarted {summary['tritonserver_restarts']} time(s); slopes: the longest-running one")
    marks = {name: s for name, s in summary["marks"].items() if s}
    heads = " | ".join(f"{name} ({s['minute']:.1f} min)" for name, s in marks.items())
    lines += ["", f"| memory, MB: anon (shmem) | {heads} | slope MB/min after warm-up |",
              "|---|" + "---|" * (len(marks) + 1)]  # fmt: skip
    slopes = summary["slopes_mb_per_min"]

    def rate(key):
        return "-" if slopes.get(key) is None else f"{slopes[key]:+.2f}"

    for group in sorted({g for s in marks.values() for g in s["groups"]}):
        cells = []
        for s in marks.values():
            g = s["groups"].get(group)
            cells.append("-" if g is None else f"{g['anon_mb']:.0f} ({g['shmem_mb']:.0f})")
        count = max(s["groups"].get(group, {}).get("processes", 0) for s in marks.values())
        lines.append(f"| {group} [{count}] | {' | '.join(cells)} | {rate(group)} |")
    for label, key in (("/dev/shm (tmpfs blocks)", "shm_mb"), ("**total** (anon + /dev/shm)", "total_mb")):
        cells = " | ".join(f"{s[key]:.0f}" for s in marks.values())
        lines.append(f"| {label} | {cells} | {rate('/dev/shm' if key == 'shm_mb' else 'total')} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the load runs")
    parser.add_argument("--clients", type=int, default=16, help="concurrent callers, each sending its next request when answered")
    parser.add_argument("--warmup-minutes", type=float, default=5.0, help="samples before this are left out of the slope")
    parser.add_argument("--sample-s", type=float, default=30.0, help="seconds between memory samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-dir", help="default: a generated tiny random NV-Embed-v2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment for serve.sh")
    parser.add_argument("--oversized", type=int, default=0, metavar="N", help="first send N refused 18 MiB requests")
    parser.add_argument("--json", help="default: bench/results/soak-<time>.json")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="nvembed-soak-"))
    model_dir = model_dir_or_tiny(args.model_dir, scratch)
    process, grpc_url, openai_url = start_server(args, model_dir, scratch / "run")
    conditions = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(), "model_dir": args.model_dir or "tiny",
                  "env": args.env, "loadavg_at_start": os.getloadavg()}  # fmt: skip
    try:
        run = asyncio.run(soak(args, process.pid, grpc_url, openai_url))
    finally:
        stop_server(process)
    summary = summarise(run, args.warmup_minutes)
    print(table(summary, args.minutes))
    write_json({"args": vars(args), "conditions": conditions, **summary},
               args.json or str(ROOT / "bench" / "results" / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"))  # fmt: skip
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
