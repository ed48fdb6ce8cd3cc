"""A sentence-transformers model through OpenVINO on the CPU (openvino_runtime.py, cpu_engine openvino,
the default): the same vectors as the library's own torch forward pass, in the precision asked for,
from several threads at once, without network, and beside a preloaded jemalloc."""

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from grpc_helpers import cosine
from sentence_transformers import SentenceTransformer
from texts import DOCUMENTS

from nvembed_triton.engine.encoders import load_encoder
from nvembed_triton.engine.openvino_runtime import NotConvertible, OpenVinoTransformer, use_openvino
from nvembed_triton.launcher.memory import allocator_environment, find_jemalloc
from nvembed_triton.launcher.serve import demo_model_dir
from nvembed_triton.protocol.options import TextOptions
from nvembed_triton.settings import EncoderSettings

# Lone texts (no padding), a batch of mixed lengths (padding), one past the model's 256 tokens.
TEXTS = ["hi", "what is the capital of france?", *DOCUMENTS, "word " * 400]


def encoder(**parameters):
    return load_encoder(EncoderSettings.from_parameters({"model_dir": str(demo_model_dir()), "device": "cpu", **parameters}))


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """The library's own fp32 torch forward pass, one text per call and all together."""
    model = SentenceTransformer(str(demo_model_dir()), device="cpu")
    return model.encode(TEXTS, normalize_embeddings=True, batch_size=len(TEXTS))


@pytest.fixture(scope="module")
def openvino_encoder():
    return encoder()


def test_the_default_cpu_engine_is_openvino_in_fp32_and_matches_torch(openvino_encoder, reference):
    assert openvino_encoder.runs_on.startswith("OpenVINO 20") and "computing in f32" in openvino_encoder.runs_on
    assert isinstance(openvino_encoder.model[0].auto_model, OpenVinoTransformer)
    together = openvino_encoder.encode(TEXTS, TextOptions.each(len(TEXTS))).embeddings
    alone = np.vstack([openvino_encoder.encode([text], TextOptions.each(1)).embeddings for text in TEXTS])
    for ours in (together, alone):
        assert np.abs(ours - reference).max() < 1e-5 and cosine(ours, reference).min() >= 0.99999


def test_instructions_and_start_truncation_go_through_openvino_as_through_torch(openvino_encoder):
    torch_encoder = encoder(cpu_engine="torch")
    options = [TextOptions(instruction="query: ", truncate="START"), TextOptions(instruction="", truncate="END")] * 3
    texts = ["word " * 400 + "the end", "a question?", *DOCUMENTS[:4]]
    ours, theirs = (e.encode(texts, options) for e in (openvino_encoder, torch_encoder))
    assert cosine(ours.embeddings, theirs.embeddings).min() >= 0.99999
    assert ours.token_counts.tolist() == theirs.token_counts.tolist() and ours.truncated.tolist() == theirs.truncated.tolist()


def test_bf16_is_computed_in_bf16_only_when_asked_and_stays_within_the_bound(reference):
    """dtype bf16 on the CPU: OpenVINO computes in bf16 where the CPU offers it (and says which)."""
    import openvino

    offered = "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    bf16 = encoder(dtype="bf16")
    assert bf16.runs_on.startswith("OpenVINO 20") and f"computing in {'bf16' if offered else 'f32'}" in bf16.runs_on
    ours = bf16.encode(TEXTS, TextOptions.each(len(TEXTS))).embeddings
    assert cosine(ours, reference).min() >= 0.9999


def test_threads_encoding_at_once_each_get_their_own_vectors(openvino_encoder, reference):
    """The encoder's lanes call encode() from their own threads; each thread has its own infer request."""
    results: dict[int, np.ndarray] = {}

    def embed(index: int) -> None:
        for _ in range(5):
            results[index] = openvino_encoder.encode([TEXTS[index]], TextOptions.each(1)).embeddings[0]

    threads = [threading.Thread(target=embed, args=(i,)) for i in range(len(TEXTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cosine(np.stack([results[i] for i in range(len(TEXTS))]), reference).min() >= 0.99999


def test_a_model_whose_output_is_not_the_hidden_states_is_left_to_torch():
    model = SentenceTransformer(str(demo_model_dir()), device="cpu")
    # A new mapping, not the library's own changed in place: that one is shared by every model loaded later.
    model[0].modality_config = {**model[0].modality_config, "text": {"method": "forward", "method_output_name": "pooler_output"}}
    network = model[0].auto_model
    with pytest.raises(NotConvertible, match="pooler_output"):
        use_openvino(model, threads=1, dtype="float32")
    assert model[0].auto_model is network


LOAD_OFFLINE = """
import json, socket, sys
attempts = []
def refuse(*args, **kwargs):
    attempts.append(repr(args[1:]))
    raise OSError("a network connection was attempted")
socket.socket.connect = socket.socket.connect_ex = socket.getaddrinfo = refuse
from nvembed_triton.engine.encoders import load_encoder
from nvembed_triton.protocol.options import TextOptions
from nvembed_triton.settings import EncoderSettings
encoder = load_encoder(EncoderSettings.from_parameters({"model_dir": sys.argv[1], "device": "cpu"}))
vector = encoder.encode(["hello"], TextOptions.each(1)).embeddings[0]
print(json.dumps({"runs_on": encoder.runs_on, "norm": float((vector ** 2).sum()), "attempts": attempts}))
"""


def load_in_subprocess(environ: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LOAD_OFFLINE, str(demo_model_dir())], capture_output=True, text=True,
                          env={**os.environ, **environ}, timeout=300)  # fmt: skip


def launcher_environment() -> dict[str, str]:
    """What serve.sh adds for tritonserver and its stubs (serving/memory.py): jemalloc preloaded,
    and oneTBB's switch that keeps hwloc on the preloaded malloc."""
    assert find_jemalloc() is not None, "libjemalloc2 is part of the test machine's setup (.ci/run, Dockerfile)"
    environ, _ = allocator_environment("auto", {})
    assert environ["LD_PRELOAD"].endswith("libjemalloc.so.2") and environ["TBB_ENABLE_SANITIZERS"] == "1"
    return environ


def test_under_the_launchers_malloc_loading_and_encoding_attempt_no_connection():
    """`import openvino` imports its telemetry package (for convert_model, which this path never
    calls); nothing may look up a host or connect. Run as the stubs run: beside jemalloc."""
    result = load_in_subprocess(launcher_environment())
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = json.loads(result.stdout.splitlines()[-1])
    assert loaded["runs_on"].startswith("OpenVINO") and abs(loaded["norm"] - 1) < 1e-5 and loaded["attempts"] == []


def test_without_onetbbs_switch_openvino_aborts_beside_a_preloaded_jemalloc():
    """Why serve.sh sets TBB_ENABLE_SANITIZERS: hwloc's free() bound to glibc's, on jemalloc's memory."""
    without_switch = {name: value for name, value in launcher_environment().items() if name != "TBB_ENABLE_SANITIZERS"}
    crashed = load_in_subprocess(without_switch)  # SIGABRT or SIGSEGV
    assert crashed.returncode < 0, crashed.stderr[-2000:]
