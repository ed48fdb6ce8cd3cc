"""The instance group serve.sh writes, checked in the config Triton reads: one model instance per
GPU (NVEMBED_GPUS; without a GPU here: the device each instance then loads on)."""

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from nvembed_triton.launcher.serve import parser, plan, server_settings
from nvembed_triton.protocol.contract import PUBLIC_MODEL
from nvembed_triton.settings import EncoderSettings, SettingsError


def serve_plan(tiny_checkpoint):
    return plan(parser().parse_args(["--model-dir", str(tiny_checkpoint)]), environ={})


def model_config(settings) -> model_config_pb2.ModelConfig:
    text = (settings.model_repository / PUBLIC_MODEL / "config.pbtxt").read_text()
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_nvembed_gpus_gives_one_model_instance_per_gpu_and_keeps_the_rest(tiny_checkpoint, tmp_path):
    shipped = model_config(server_settings(serve_plan(tiny_checkpoint), tmp_path / "shipped", {}))
    config = model_config(server_settings(serve_plan(tiny_checkpoint), tmp_path / "gpus", {"NVEMBED_GPUS": "0,1,3"}))
    assert len(config.instance_group) == 1
    group = config.instance_group[0]
    assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU and group.count == 1 and list(group.gpus) == [0, 1, 3]
    del shipped.instance_group[:], config.instance_group[:]
    assert config == shipped  # inputs, outputs and parameters as shipped
    # Triton then starts instance i on gpus[i]; each loads its own copy of the weights there.
    for gpu in (0, 1, 3):
        assert EncoderSettings.from_parameters({"model_dir": "/m"}, "KIND_GPU", str(gpu)).device == f"cuda:{gpu}"


def test_without_nvembed_gpus_the_shipped_instance_group_stays(tiny_checkpoint, tmp_path):
    config = model_config(server_settings(serve_plan(tiny_checkpoint), tmp_path, {}))
    assert [(g.kind, g.count) for g in config.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_CPU, 1)]


@pytest.mark.parametrize("value", ["a,b", "0,0", "-1"])
def test_bad_nvembed_gpus_is_refused(tiny_checkpoint, tmp_path, value):
    with pytest.raises(SettingsError, match="NVEMBED_GPUS"):
        server_settings(serve_plan(tiny_checkpoint), tmp_path, {"NVEMBED_GPUS": value})
