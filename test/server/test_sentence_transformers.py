"""Other embedding models on the same contract, loaded by sentence-transformers itself: a real
model (all-MiniLM-L6-v2, shipped on PyPI) through the server, and tiny random models of the other
architectures the user's documents name, in process."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from grpc_helpers import cosine, embed_documents, embed_query
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer import modules as models
from texts import DOCUMENTS
from transformers import BertConfig, BertModel, BertTokenizerFast, MPNetConfig, MPNetModel

from nvembed_triton.engine.encoders import load_encoder
from nvembed_triton.launcher.serve import DEMO_MODEL, demo_model_dir
from nvembed_triton.protocol.options import TextOptions
from nvembed_triton.settings import EncoderSettings

TEXTS = DOCUMENTS


@pytest.fixture(scope="module")
def reference_minilm():
    return SentenceTransformer(str(demo_model_dir()), device="cpu")


def test_minilm_through_the_server_equals_sentence_transformers(minilm_server, reference_minilm):
    with minilm_server.client() as client:
        documents = embed_documents(client, DEMO_MODEL, TEXTS)
        query = embed_query(client, DEMO_MODEL, "How do neural networks learn patterns from examples?")
    assert documents.shape == (4, 384) and documents.dtype == np.float32
    expected = reference_minilm.encode(TEXTS, normalize_embeddings=True)
    assert np.all(cosine(documents, expected) >= 0.9999)
    expected_query = reference_minilm.encode(["How do neural networks learn patterns from examples?"], normalize_embeddings=True)
    assert cosine(query, expected_query) >= 0.9999
    # The default CPU engine, in the model's own precision (openvino_runtime.py).
    assert re.search(r"\(float32, OpenVINO 20[0-9.]+, computing in f32, \d+ threads\)", minilm_server.log_path.read_text())


def test_user_test_script_passes_against_minilm_with_ranking(minilm_server):
    script = Path(__file__).parents[1] / "test-nv-embed-v2.py"
    result = subprocess.run(
        [sys.executable, str(script), "--url", minilm_server.url, "--model", DEMO_MODEL],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed, 0 failed" in result.stdout


def tiny_st_model(directory: Path, architecture: str, pooling: str, prompts: dict) -> Path:
    """A random sentence-transformers model in the layout `save` writes, with a real BERT vocab."""
    tokenizer = BertTokenizerFast.from_pretrained(str(demo_model_dir()))  # a real vocabulary
    sizes = {
        "vocab_size": tokenizer.vocab_size,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    }
    if architecture == "bert":  # bge-large-en-v1.5, e5-large-v2, bge-large-zh-v1.5, m3e-large
        network = BertModel(BertConfig(**sizes))
    else:  # all-mpnet-base-v2
        network = MPNetModel(MPNetConfig(**sizes))
    source = directory / "hf"
    network.save_pretrained(source)
    tokenizer.save_pretrained(source)
    transformer = models.Transformer(str(source), max_seq_length=128)
    model = SentenceTransformer(modules=[transformer, models.Pooling(32, pooling), models.Normalize()], prompts=prompts)
    model.save(str(directory / "st"))
    return directory / "st"


@pytest.mark.parametrize(
    "architecture,pooling,prompts",
    [
        ("bert", "cls", {"query": "Represent this sentence for searching relevant passages: "}),  # bge style
        ("bert", "mean", {"query": "query: ", "passage": "passage: "}),  # e5 style
        ("mpnet", "mean", {}),  # all-mpnet-base-v2 style
    ],
)
def test_other_architectures_load_and_use_their_own_prompts(tmp_path, architecture, pooling, prompts):
    directory = tiny_st_model(tmp_path, architecture, pooling, prompts)
    encoder = load_encoder(EncoderSettings.from_parameters({"model_dir": str(directory), "device": "cpu"}))
    reference = SentenceTransformer(str(directory), device="cpu")
    query_prompt = prompts.get("query", "")
    assert encoder.default_instruction("query") == query_prompt
    assert encoder.default_instruction("document") == prompts.get("passage", "")
    ours = encoder.encode(TEXTS, TextOptions.each(len(TEXTS), instruction=query_prompt)).embeddings
    expected = reference.encode(TEXTS, prompt=query_prompt, normalize_embeddings=True)
    assert np.all(cosine(ours, expected) >= 0.9999)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)


def test_python_files_in_a_sentence_transformers_directory_never_run(tmp_path):
    """Models with custom code name it in config.json's auto_map. Here that file leaves a marker
    if imported: the encoder loads the architecture natively and never imports it."""
    directory = tiny_st_model(tmp_path, "bert", "mean", {})
    marker = tmp_path / "remote-code-ran"
    (directory / "modeling_custom.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_custom.CustomModel", "AutoConfig": "modeling_custom.CustomConfig"}
    (directory / "config.json").write_text(json.dumps(config))
    encoder = load_encoder(EncoderSettings.from_parameters({"model_dir": str(directory), "device": "cpu"}))
    ours = encoder.encode(TEXTS, TextOptions.each(len(TEXTS))).embeddings
    assert not marker.exists()
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)
