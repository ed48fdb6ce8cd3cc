"""The benchmark-only stand-in (setting stand_in = constant): the network is replaced, everything
else runs, and it is never served as nv-embed-v2."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nvembed_triton.engine.checkpoint import Architecture, CheckpointError, check_served_name
from nvembed_triton.engine.encoders import load_encoder
from nvembed_triton.protocol.options import TextOptions
from nvembed_triton.settings import EncoderSettings, SettingsError

ROOT = Path(__file__).resolve().parents[2]


def encoder_settings(tiny_checkpoint, **values):
    return EncoderSettings.from_parameters({"model_dir": str(tiny_checkpoint), "device": "cpu", **values}, environ={})


def test_serve_sh_refuses_the_stand_in_under_the_public_name(tiny_checkpoint):
    result = subprocess.run(
        [str(ROOT / "serve.sh"), "--model-dir", str(tiny_checkpoint), "--device", "cpu"],
        env={**os.environ, "PYTHON": sys.executable, "NVEMBED_STAND_IN": "constant"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "constant stand-in (benchmark only)" in result.stderr and "cannot be served as 'nv-embed-v2'" in result.stderr
    assert "starting tritonserver" not in result.stdout


def test_the_model_refuses_it_under_the_public_name_too():
    """For a server started without serve.sh: the model's load-time check."""
    for name in ("nv-embed-v2", "nv-embed-v2-copy"):
        with pytest.raises(CheckpointError, match="cannot be served"):
            check_served_name(name, Architecture.STAND_IN)
    check_served_name("plumbing", Architecture.STAND_IN)


def test_an_unknown_stand_in_is_refused(tiny_checkpoint):
    with pytest.raises(SettingsError, match="stand_in"):
        encoder_settings(tiny_checkpoint, stand_in="zeros")


def test_the_stand_in_tokenises_plans_and_answers_without_a_network(tiny_checkpoint):
    stand_in = load_encoder(encoder_settings(tiny_checkpoint, stand_in="constant", max_batch_tokens="64"))
    real = load_encoder(encoder_settings(tiny_checkpoint, max_batch_tokens="64"))
    texts = ["a short one", "a longer text about bread and flour " * 8, "x"]
    ours, expected = stand_in.encode(texts, TextOptions.each(3)), real.encode(texts, TextOptions.each(3))
    assert not hasattr(stand_in, "model")  # no weights were loaded
    assert ours.embeddings.shape == (3, 4096) and np.allclose(np.linalg.norm(ours.embeddings, axis=1), 1.0)
    assert (ours.token_counts == expected.token_counts).all()  # the same tokenisation
    assert ours.passes == expected.passes > 1  # and the same planning into passes
