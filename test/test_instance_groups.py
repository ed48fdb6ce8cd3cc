"""The instance groups serve.sh writes, checked in the config Triton reads: one encoder instance
per GPU (NVEMBED_GPUS, without a GPU: the device each instance then loads on), and the public
model's instance count (NVEMBED_PUBLIC_INSTANCES)."""

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from nvembed_triton.protocol.contract import PUBLIC_MODEL, encoder_model_name
from nvembed_triton.protocol.settings import EncoderSettings, SettingsError
from nvembed_triton.serving.serve import parser, plan, server_settings


def serve_plan(tiny_checkpoint):
    return plan(parser().parse_args(["--model-dir", str(tiny_checkpoint)]), environ={})


def config_of(settings, model: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse((settings.model_repository / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def encoder_config(settings) -> model_config_pb2.ModelConfig:
    return config_of(settings, encoder_model_name(PUBLIC_MODEL))


def test_nvembed_gpus_gives_one_encoder_instance_per_gpu(tiny_checkpoint, tmp_path):
    settings = server_settings(serve_plan(tiny_checkpoint), tmp_path, {"NVEMBED_GPUS": "0,1,3"})
    config = encoder_config(settings)
    assert len(config.instance_group) == 1
    group = config.instance_group[0]
    assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU and group.count == 1 and list(group.gpus) == [0, 1, 3]
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 64  # the rest of the config is kept
    # Triton then starts instance i on gpus[i]; each loads its own copy of the weights there.
    for gpu in (0, 1, 3):
        assert EncoderSettings.from_parameters({"model_dir": "/m"}, "KIND_GPU", str(gpu)).device == f"cuda:{gpu}"


def test_without_nvembed_gpus_the_shipped_instance_group_stays(tiny_checkpoint, tmp_path):
    config = encoder_config(server_settings(serve_plan(tiny_checkpoint), tmp_path, {}))
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]


@pytest.mark.parametrize("value", ["a,b", "0,0", "-1"])
def test_bad_nvembed_gpus_is_refused(tiny_checkpoint, tmp_path, value):
    with pytest.raises(SettingsError, match="NVEMBED_GPUS"):
        server_settings(serve_plan(tiny_checkpoint), tmp_path, {"NVEMBED_GPUS": value})


def test_nvembed_public_instances_sets_the_public_models_count_and_keeps_the_rest(tiny_checkpoint, tmp_path):
    eight = {"NVEMBED_PUBLIC_INSTANCES": "8"}
    shipped = config_of(server_settings(serve_plan(tiny_checkpoint), tmp_path / "shipped", {}), PUBLIC_MODEL)
    settings = server_settings(serve_plan(tiny_checkpoint), tmp_path / "set", eight)
    config = config_of(settings, PUBLIC_MODEL)
    assert [(g.kind, g.count) for g in shipped.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_CPU, 2)]
    assert [(g.kind, g.count) for g in config.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_CPU, 8)]
    del shipped.instance_group[:], config.instance_group[:]
    assert config == shipped  # inputs, outputs, queue policy and parameters as shipped
    assert len(encoder_config(settings).instance_group) == 1  # the encoder's own is left alone


@pytest.mark.parametrize("value", ["0", "-2", "many"])
def test_bad_nvembed_public_instances_is_refused(tiny_checkpoint, tmp_path, value):
    with pytest.raises(SettingsError, match="NVEMBED_PUBLIC_INSTANCES"):
        server_settings(serve_plan(tiny_checkpoint), tmp_path, {"NVEMBED_PUBLIC_INSTANCES": value})
