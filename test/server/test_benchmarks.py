"""Every benchmark in bench/ is one that runs today: each starts and answers --help (its imports
and arguments hold after the package changes under it). The latency benchmarks run end to end on
the CPU with the tiny checkpoint, so they still work on the day a machine is lent to measure with
them: bench/bench_latency.py (Triton's trace of lone
queries, stage by stage, with tracing on for every request, and the fresh-process comparison) and
bench/bench_gpu_server.py --tiny (the one-call GPU run's own smoke test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.server  # starts real tritonservers

BENCH = ROOT / "bench"


def run_bench(script: str, *args: str, timeout_s: float = 420) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=BENCH, env=env, capture_output=True, text=True,
                          timeout=timeout_s)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def test_bench_latency_splits_a_lone_query_into_stages_that_add_up(tmp_path, tiny_checkpoint):
    out = tmp_path / "latency.json"
    run_bench("bench_latency.py", "--model-dir", str(tiny_checkpoint), "--queries", "40", "--rounds", "2", "--json", str(out))
    results = json.loads(out.read_text())
    assert len(results["rounds"]) == 2
    for stages in [*results["rounds"], results["first request"]]:
        total = stages.pop("total (client)")["p50"]
        assert all(stage["p50"] > 0 for stage in stages.values()), stages
        # Medians of parts need not add up to the median of the whole, but each part is a slice of it.
        assert 0.5 * total < sum(stage["p50"] for stage in stages.values()) < 1.5 * total
        # The trace spans the computation: the model's stage holds at least the encoder's own time.
        assert results["in-process encode p50 ms"][0] * 0.5 < stages["the model"]["p50"] < total
    assert all(ms > 0 for ms in results["in-process encode p50 ms"])
    fresh = results["fresh process"]
    assert fresh["p50 ms"] > 0 and fresh["server p50 ms"] > fresh["p50 ms"]


def test_the_gpu_run_script_passes_its_cpu_smoke_test(tmp_path, tiny_checkpoint):
    """Every phase of the one-call GPU run, on the CPU with the tiny network; this checkout's own
    package stands in for the baseline (the run takes the baseline's src/ as --before-src)."""
    out = tmp_path / "gpu-server.json"
    run_bench(
        "bench_gpu_server.py", "--tiny", "--tokenizer-dir", str(tiny_checkpoint), "--scratch", str(tmp_path / "scratch"),
        "--before-src", str(ROOT / "src"), "--json", str(out), "--documents", "24", "--lone-queries", "30",
        "--seconds", "1", "--repeats", "1", timeout_s=900,
    )  # fmt: skip
    results = json.loads(out.read_text())
    assert not [phase for phase, values in results.items() if isinstance(values, dict) and "error" in values], results
    for name in ("server before", "server after"):
        server = results[name]
        assert server["lone_query"]["n"] == 30
        assert set(server["lone_query_stages"]) >= {"into the model", "the model", "total (client)"}
        assert [row["clients"] for row in server["queries"]] == [1, 16, 64]
        assert all(row["requests_per_s"] > 0 for row in server["queries"]) and server["documents_tokens_per_s"] > 0
    assert all(row["passes"]["rows_p50"] >= 1 for row in results["server after"]["queries"])  # its pass log
    in_process = results["in-process"]
    assert "compiled layers" in in_process["runs_on"] and in_process["weight_bytes_per_pass"] > 0
    documents = in_process["documents"]
    assert documents["packed"]["computed_per_token"] == 1.0 < documents["padded"]["computed_per_token"]
    assert in_process["packed vs padded, min cosine"] > 0.99999
    # The scripts' own cosines: the new server's vectors are the baseline's, fp32's and FP8's close.
    assert results["faithfulness"]["server after vs before, min cosine"] > 0.9999
    assert results["precision"]["fp32 vs in-process packed, min cosine"] > 0.9999
    assert "FP8" in results["fp8"]["runs_on"] and results["fp8"]["cosine_vs_fp16"]["min"] > 0.9


@pytest.mark.parametrize("script", sorted(path.name for path in BENCH.glob("bench_*.py")))
def test_every_benchmark_starts(script):
    done = subprocess.run([sys.executable, str(BENCH / script), "--help"], cwd=BENCH, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr[-3000:]
