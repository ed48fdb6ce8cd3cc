"""Every path the GPU engine takes, run on the CPU for exact vectors against the independent
reference: packed passes (texts end to end, no padding), the layers' dense parts compiled by
torch.compile, FP8 linear layers, and the fallbacks when a compile cannot happen. Their speed is
measured on a GPU by bench/bench_gpu_server.py; CI has none."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from grpc_helpers import cosine
from nvembed_reference import ReferenceNVEmbed

from nvembed_triton.engine.encoders import load_encoder
from nvembed_triton.engine.packing import pack, plan_packed
from nvembed_triton.protocol.contract import RETRIEVAL_TASK, nvembed_query_instruction
from nvembed_triton.protocol.options import TextOptions
from nvembed_triton.settings import EncoderSettings

INSTRUCTION = nvembed_query_instruction(RETRIEVAL_TASK)
WORDS = "bread flour yeast water salt market price supply demand network learns".split()


def texts_of(count: int, seed: int = 0, longest: int = 300) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, longest))) for _ in range(count)]


TEXTS = ["How do neural networks learn?", "x", *texts_of(10)]


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return ReferenceNVEmbed(tiny_checkpoint)


def encoder_for(tiny_checkpoint, **parameters):
    return load_encoder(EncoderSettings.from_parameters({"model_dir": str(tiny_checkpoint), "device": "cpu", **parameters}))


def reference_vectors(reference, texts, instruction=""):
    return np.stack([reference.embed(text, instruction) for text in texts])


def test_pack_lays_texts_end_to_end_with_their_own_positions():
    packed = pack([[1, 5, 6, 2], [1, 7, 2], [1, 9]], pool_from=[2, 1, 0])
    assert packed.input_ids.tolist() == [1, 5, 6, 2, 1, 7, 2, 1, 9]
    assert packed.positions.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1]
    assert packed.starts.tolist() == [0, 4, 7, 9] and packed.starts.dtype == torch.int32 and packed.longest == 4
    assert packed.pooled.tolist() == [2, 3, 5, 6, 7, 8] and packed.pooled_text.tolist() == [0, 0, 1, 1, 2, 2]


def test_packed_passes_fill_the_budget_with_real_tokens_only():
    lengths = [900, 16, 2048, 300, 40, 1500, 700]
    plan = plan_packed(lengths, 4096)
    assert sorted(i for batch in plan for i in batch) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in batch) <= 4096 or len(batch) == 1 for batch in plan)
    assert len(plan) == 2  # 5504 real tokens: two passes, where padded rows would need more
    assert plan_packed([5000, 10], 4096) == [[0], [1]]  # longer than the budget: a pass alone


@pytest.mark.parametrize("instruction", ["", INSTRUCTION])
def test_packed_passes_give_the_reference_vectors(tiny_checkpoint, reference, instruction):
    encoder = encoder_for(tiny_checkpoint, passes="packed")
    assert "packed passes" in encoder.runs_on
    result = encoder.encode(TEXTS, TextOptions.each(len(TEXTS), instruction=instruction))
    expected = reference_vectors(reference, TEXTS, instruction)
    assert np.abs(result.embeddings - expected).max() < 1e-5
    assert np.all(cosine(result.embeddings, expected) >= 0.99999)
    assert {record.path for record in result.records} == {"packed"}


def test_packed_passes_compute_no_padding_on_a_mixed_set(tiny_checkpoint):
    """Documents of 16-2048 tokens: the tokens computed over the tokens embedded (the model's
    nvembed_padded_tokens_total over nvembed_tokens_total) is 1.0 packed, and more padded."""
    rng = random.Random(1)
    documents = [" ".join(rng.choices(WORDS, k=int(np.exp(rng.uniform(np.log(16), np.log(2000)))))) for _ in range(48)]
    ratios = {}
    for passes in ("packed", "padded"):
        result = encoder_for(tiny_checkpoint, passes=passes).encode(documents, TextOptions.each(len(documents)))
        ratios[passes] = result.padded_tokens / int(result.token_counts.sum())
    print(f"tokens computed per token embedded: {ratios}")
    assert ratios["packed"] == 1.0 and ratios["padded"] > 1.0


def test_packed_and_padded_passes_drop_what_keep_drops(tiny_checkpoint):
    encoder = encoder_for(tiny_checkpoint, passes="packed", max_batch_tokens="64")
    texts = texts_of(12, seed=3, longest=40)
    dropped = set(range(0, 12, 3))
    result = encoder.encode(texts, TextOptions.each(12), keep=lambda batch: [i for i in batch if i not in dropped])
    assert np.isnan(result.embeddings[sorted(dropped)]).all()
    kept = sorted(set(range(12)) - dropped)
    alone = encoder_for(tiny_checkpoint, passes="padded").encode([texts[i] for i in kept], TextOptions.each(len(kept)))
    assert np.all(cosine(result.embeddings[kept], alone.embeddings) >= 0.99999)


def test_compiled_layers_give_the_reference_vectors(tiny_checkpoint, reference):
    encoder = encoder_for(tiny_checkpoint, compile="on", cpu_engine="torch")
    assert "compiled layers" in encoder.runs_on, encoder.runs_on
    for passes in (False, True):  # the compiled parts serve padded rows and packed streams alike
        encoder.packed = passes
        vectors = encoder.encode(TEXTS, TextOptions.each(len(TEXTS))).embeddings
        assert np.all(cosine(vectors, reference_vectors(reference, TEXTS)) >= 0.99999), passes


def load_in_a_subprocess(tiny_checkpoint, tmp_path, environment: dict[str, str]) -> tuple[str, str, np.ndarray]:
    """An encoder with compile on, loaded in a fresh process with `environment`: (its runs_on, its
    stderr, its vectors of TEXTS)."""
    code = (
        "import sys, numpy as np\n"
        "from nvembed_triton.engine.encoders import load_encoder\n"
        "from nvembed_triton.protocol.options import TextOptions\n"
        "from nvembed_triton.settings import EncoderSettings\n"
        f"encoder = load_encoder(EncoderSettings.from_parameters({{'model_dir': {str(tiny_checkpoint)!r}, 'device': 'cpu',"
        " 'compile': 'on', 'cpu_engine': 'torch'}))\n"
        "print(encoder.runs_on)\n"
        f"np.save({str(tmp_path / 'v.npy')!r}, encoder.encode({TEXTS!r}, TextOptions.each({len(TEXTS)})).embeddings)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                            env={**os.environ, **environment})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, result.stderr, np.load(tmp_path / "v.npy")


def test_a_compile_cache_that_cannot_be_written_moves_to_the_temporary_directory(tiny_checkpoint, reference, tmp_path):
    """A read-only filesystem where the cache was meant to be: importing torch._dynamo alone would
    fail there (it creates the directory), compile or not. The cache moves, the log says so."""
    unwritable = "/proc/no-cache-here"  # not writable, even by root
    runs_on, log, vectors = load_in_a_subprocess(tiny_checkpoint, tmp_path, {"TORCHINDUCTOR_CACHE_DIR": unwritable})
    assert "compiled layers" in runs_on and f"{unwritable} cannot be written" in log and "nvembed-compile-cache-" in log
    assert np.all(cosine(vectors, reference_vectors(reference, TEXTS)) >= 0.99999)


def test_a_compile_that_fails_keeps_the_eager_layers_and_says_why(tiny_checkpoint, reference, tmp_path):
    """No C++ compiler for Inductor's CPU code: the model loads with eager layers and the same vectors."""
    runs_on, _, vectors = load_in_a_subprocess(tiny_checkpoint, tmp_path, {"CXX": "/bin/false", "CC": "/bin/false"})
    assert "eager layers (torch.compile failed" in runs_on, runs_on
    assert np.all(cosine(vectors, reference_vectors(reference, TEXTS)) >= 0.99999)


def test_fp8_linear_layers_stay_close_to_fp32_on_the_cpu(tiny_checkpoint, reference):
    """FP8 rounds every matmul input: on random weights only closeness can be checked, and that
    every backbone projection really runs as FP8 (the head does not)."""
    from nvembed_triton.engine.fp8 import Fp8Linear

    encoder = encoder_for(tiny_checkpoint, fp8="on")
    layers = encoder.model.backbone.layers
    assert all(isinstance(getattr(layer, name), Fp8Linear) for layer in layers for name in ("qkv", "out", "gate_up", "down"))
    assert all(getattr(layer, name).weight.dtype == torch.float8_e4m3fn for layer in layers for name in ("qkv", "down"))
    assert not any(isinstance(module, Fp8Linear) for module in encoder.model.head.modules())
    vectors = encoder.encode(TEXTS, TextOptions.each(len(TEXTS))).embeddings
    similarity = cosine(vectors, reference_vectors(reference, TEXTS))
    print(f"FP8 vs fp32 on the tiny random model: min cosine {similarity.min():.5f}")
    assert np.isfinite(vectors).all() and similarity.min() >= 0.98


def test_fp8_with_compiled_layers_gives_the_eager_fp8_vectors(tiny_checkpoint):
    eager = encoder_for(tiny_checkpoint, fp8="on").encode(TEXTS, TextOptions.each(len(TEXTS))).embeddings
    encoder = encoder_for(tiny_checkpoint, fp8="on", compile="on")
    assert "compiled layers" in encoder.runs_on, encoder.runs_on
    assert np.all(cosine(encoder.encode(TEXTS, TextOptions.each(len(TEXTS))).embeddings, eager) >= 0.999)


def test_the_fp8_check_command_judges_by_the_worst_text(tiny_checkpoint, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    command = [sys.executable, "-m", "nvembed_triton.engine.fp8_check", "--model-dir", str(tiny_checkpoint), "--texts",
               str(texts), "--device", "cpu", "--dtype", "fp32"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    line = next(line for line in result.stdout.splitlines() if "min cosine" in line)
    worst = float(line.split("min cosine ")[1].split()[0])
    assert f"{len(TEXTS)} texts, FP8 vs fp32" in line
    assert (result.returncode, "NOT SAFE" in result.stdout) == ((1, True) if worst < 0.99 else (0, False)), result.stdout
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert subprocess.run([*command[:6], str(empty), *command[7:]], capture_output=True, timeout=120).returncode == 2


def test_the_h200_stand_in_waits_a_passes_time(tiny_checkpoint):
    from nvembed_triton.engine.stand_in import H200_SMALL_PASS_MS, h200_pass_ms

    encoder = encoder_for(tiny_checkpoint, stand_in="h200")
    result = encoder.encode(["a query"], TextOptions.each(1))
    assert result.records[0].wall_ms >= H200_SMALL_PASS_MS
    assert h200_pass_ms(32) == H200_SMALL_PASS_MS and h200_pass_ms(16384) > 500  # small passes read weights, large compute
