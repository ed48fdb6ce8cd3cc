import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nvembed_triton.engine.checkpoint import (
    Architecture,
    CheckpointError,
    LatentAttentionSettings,
    check_model_dir,
    check_weight_files,
    missing_nvembed_files,
)
from nvembed_triton.launcher.serve import demo_model_dir

ROOT = Path(__file__).resolve().parents[2]
SHARD = "model-00002-of-00002.safetensors"


def test_published_config_falls_back_to_the_official_latent_attention_defaults():
    settings = LatentAttentionSettings.from_config({"model_type": "latent_attention"})
    assert settings == LatentAttentionSettings(
        num_latents_value=512, num_cross_heads=8, cross_dim_head=4096, hidden_dim=4096, latent_dim=4096
    )


def test_tiny_checkpoint_has_the_published_layout(tiny_checkpoint):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["model_type"] == "nvembed" and config["architectures"] == ["NVEmbedModel"]
    assert config["text_config"]["model_type"] == "bidir_mistral"
    assert "num_cross_heads" not in config["latent_attention_config"]  # exercises the default
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    assert "embedding_model.layers.1.self_attn.k_proj.weight" in names
    assert "latent_attention_model.cross_attend_blocks.0.fn.to_kv.weight" in names
    assert "latent_attention_model.cross_attend_blocks.1.fn.net.2.bias" in names
    assert len(set(index["weight_map"].values())) == 2
    for shard in set(index["weight_map"].values()):
        with safe_open(tiny_checkpoint / shard, framework="pt") as f:
            assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.float16}
    assert {"tokenizer.json", "tokenizer.model", "tokenizer_config.json"} <= {p.name for p in tiny_checkpoint.iterdir()}


def test_architecture_is_detected(tiny_checkpoint):
    assert check_model_dir(tiny_checkpoint) is Architecture.NV_EMBED_V2
    assert check_model_dir(demo_model_dir()) is Architecture.SENTENCE_TRANSFORMERS


def test_missing_shard_is_named(tiny_checkpoint, tmp_path):
    copy = shutil.copytree(tiny_checkpoint, tmp_path / "copy")
    (copy / "model-00002-of-00002.safetensors").unlink()
    assert missing_nvembed_files(copy) == ["model-00002-of-00002.safetensors"]
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        check_model_dir(copy)


def test_absent_directory_says_how_to_get_the_weights(tmp_path):
    with pytest.raises(CheckpointError, match="huggingface-cli download nvidia/NV-Embed-v2"):
        check_model_dir(tmp_path / "nowhere")


def test_unknown_directory_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match="neither"):
        check_model_dir(tmp_path)


def damaged_copy(tiny_checkpoint, tmp_path) -> tuple[Path, Path]:
    """A private copy of the shared checkpoint and its second shard, to damage."""
    copy = shutil.copytree(tiny_checkpoint, tmp_path / "copy")
    return copy, copy / SHARD


def rewrite_header(shard: Path, edit) -> None:
    """Rewrite a shard's JSON header through `edit`, keeping its data section byte for byte."""
    raw = shard.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    edit(header)
    encoded = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + header_len :])


def assert_refused(model_dir: Path, shard: Path, problem: str) -> None:
    with pytest.raises(CheckpointError, match=problem) as error:
        check_model_dir(model_dir)
    assert str(shard) in str(error.value)
    assert f"huggingface-cli download nvidia/NV-Embed-v2 {shard.name}" in str(error.value)


def test_intact_shards_pass_the_header_check(tiny_checkpoint):
    check_weight_files(tiny_checkpoint)  # raises on any damage
    assert check_model_dir(tiny_checkpoint) is Architecture.NV_EMBED_V2


def test_truncated_shard_is_named(tiny_checkpoint, tmp_path):
    copy, shard = damaged_copy(tiny_checkpoint, tmp_path)
    size = shard.stat().st_size
    os.truncate(shard, size - 1000)
    assert_refused(copy, shard, f"is truncated: {size - 1000} bytes, the header needs {size}")


def test_shard_cut_inside_its_header_is_named(tiny_checkpoint, tmp_path):
    copy, shard = damaged_copy(tiny_checkpoint, tmp_path)
    os.truncate(shard, 100)
    assert_refused(copy, shard, "is truncated or corrupt: 100 bytes")
    os.truncate(shard, 5)
    assert_refused(copy, shard, "is truncated: 5 bytes")


def test_padded_shard_is_named(tiny_checkpoint, tmp_path):
    copy, shard = damaged_copy(tiny_checkpoint, tmp_path)
    with open(shard, "ab") as f:
        f.write(b"\0" * 16)
    assert_refused(copy, shard, "has 16 extra bytes after the tensor data")


@pytest.mark.parametrize(
    "corrupt, problem",
    [
        (lambda raw: b"\xde\xad\xbe\xef" * 16 + raw[64:], "has a corrupt header: it claims"),
        (lambda raw: raw[:8] + b"#" + raw[9:], "not valid JSON"),
        (lambda raw: raw[:8] + b"\xff\xfe" + raw[10:], "not valid JSON"),
        (lambda raw: struct.pack("<Q", len(raw) + 1) + raw[8:], "the header alone claims"),
        (lambda raw: struct.pack("<Q", 2**63) + raw[8:], "claims 9223372036854775808 header bytes"),
    ],
    ids=["garbage", "bad-json", "bad-utf8", "length-past-end", "huge-length"],
)
def test_corrupt_header_is_named(tiny_checkpoint, tmp_path, corrupt, problem):
    copy, shard = damaged_copy(tiny_checkpoint, tmp_path)
    shard.write_bytes(corrupt(shard.read_bytes()))
    assert_refused(copy, shard, problem)


def test_header_inconsistent_with_its_tensors_is_named(tiny_checkpoint, tmp_path):
    copy, shard = damaged_copy(tiny_checkpoint, tmp_path)
    name = json.loads((copy / "model.safetensors.index.json").read_text())["weight_map"]
    name = next(n for n, s in name.items() if s == SHARD and n.endswith("norm.weight"))

    def double_shape(header):
        header[name]["shape"] = [2 * header[name]["shape"][0]]

    rewrite_header(shard, double_shape)
    assert_refused(copy, shard, f"tensor '{name}' is F16 .* but its data_offsets")


def test_overlapping_offsets_are_named(tiny_checkpoint, tmp_path):
    copy, shard = damaged_copy(tiny_checkpoint, tmp_path)

    def shift_last_tensor(header):
        last = max((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"])
        header[last]["data_offsets"] = [o - 2 for o in header[last]["data_offsets"]]

    rewrite_header(shard, shift_last_tensor)
    assert_refused(copy, shard, "starts at data byte")


def test_tensor_missing_from_its_shard_is_named(tiny_checkpoint, tmp_path):
    copy, shard = damaged_copy(tiny_checkpoint, tmp_path)
    tensors = load_file(shard)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, shard, metadata={"format": "pt"})
    assert_refused(copy, shard, f"lacks 1 tensor\\(s\\) that model.safetensors.index.json puts in it: {dropped}")


def test_single_file_snapshot_is_checked(tiny_checkpoint, tmp_path):
    single = shutil.copytree(tiny_checkpoint, tmp_path / "single", ignore=shutil.ignore_patterns("*safetensors*"))
    weights = {}
    for shard in tiny_checkpoint.glob("model-*.safetensors"):
        weights.update(load_file(shard))
    save_file(weights, single / "model.safetensors", metadata={"format": "pt"})
    assert check_model_dir(single) is Architecture.NV_EMBED_V2
    os.truncate(single / "model.safetensors", (single / "model.safetensors").stat().st_size - 1)
    assert_refused(single, single / "model.safetensors", "is truncated")


def test_damaged_index_is_named(tiny_checkpoint, tmp_path):
    copy = shutil.copytree(tiny_checkpoint, tmp_path / "copy")
    index = copy / "model.safetensors.index.json"
    index.write_text(index.read_text()[:-40])
    assert_refused(copy, index, "is not a valid safetensors index")


def test_serve_check_refuses_a_truncated_shard_and_names_it(tiny_checkpoint, tmp_path):
    copy, shard = damaged_copy(tiny_checkpoint, tmp_path)
    os.truncate(shard, shard.stat().st_size // 2)
    result = subprocess.run(
        [str(ROOT / "serve.sh"), "--check", "--model-dir", str(copy)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert f"{shard} is truncated" in result.stderr
    assert "ok:" not in result.stdout


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe binary", b""], ids=["broken JSON", "not UTF-8", "empty"])
def test_serve_says_in_one_line_that_config_json_is_not_json(tiny_checkpoint, tmp_path, content):
    """Before: a 34-line traceback."""
    copy = shutil.copytree(tiny_checkpoint, tmp_path / "copy")
    (copy / "config.json").write_bytes(content)
    command = [str(ROOT / "serve.sh"), "--check", "--model-dir", str(copy)]
    result = subprocess.run(command, env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and f"{copy / 'config.json'} is not valid JSON" in result.stderr


def test_an_unreadable_snapshot_is_named_with_the_fix(tiny_checkpoint):
    """As the container's uid 1000 meets a snapshot written by root with mode 600. Root reads any
    file, so as root the child process drops to an unprivileged uid before the check."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="unreadable-", dir="/tmp"))  # traversable by any uid
    try:
        folder.chmod(0o755)
        snapshot = shutil.copytree(tiny_checkpoint, folder / "snapshot")
        snapshot.chmod(0o755)
        (snapshot / "model-00001-of-00002.safetensors").chmod(0o600 if os.geteuid() == 0 else 0o000)
        check = (
            "import os; from nvembed_triton.engine.checkpoint import check_model_dir\n"
            "if os.geteuid() == 0: os.setuid(65534)\n"
            f"check_model_dir({str(snapshot)!r})"
        )
        result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    finally:
        shutil.rmtree(folder)
    assert result.returncode == 1
    assert "CheckpointError: cannot read" in result.stderr and "model-00001-of-00002.safetensors" in result.stderr
    assert f"chmod -R a+rX {snapshot}" in result.stderr
