import pytest

from nvembed_triton.settings import EncoderSettings, SettingsError, check_served_name, overridden, resolve_device, resolve_dtype


def test_defaults():
    settings = EncoderSettings.from_parameters({"model_dir": "/m"})
    assert settings.device == "cuda:0"  # as in the user's README
    assert settings.dtype == "float16"
    assert settings.max_length == 32768


def test_cpu_defaults_to_float32():
    assert EncoderSettings.from_parameters({"model_dir": "/m", "device": "cpu"}).dtype == "float32"


@pytest.mark.parametrize("name,expected", [("bf16", "bfloat16"), ("fp16", "float16"), ("FP32", "float32"), ("auto", "float16")])
def test_dtype_names(name, expected):
    assert resolve_dtype(name, "cuda:0") == expected


def test_unknown_dtype_is_refused_with_the_choices():
    with pytest.raises(SettingsError, match="bf16, fp16, fp32"):
        resolve_dtype("int8", "cpu")


def test_kind_gpu_instance_uses_its_own_gpu():
    assert resolve_device("cuda:0", "GPU", "3") == "cuda:3"


def test_kind_gpu_with_cpu_device_is_a_contradiction():
    with pytest.raises(SettingsError, match="KIND_GPU"):
        resolve_device("cpu", "GPU", "0")


@pytest.mark.parametrize("value", ["gpu", "cuda:x", "tpu:0"])
def test_malformed_device_is_refused(value):
    with pytest.raises(SettingsError, match="cuda:N"):
        resolve_device(value, "CPU", "0")


def test_environment_overrides_parameters():
    merged = overridden({"device": "cuda:0", "model_dir": "/a"}, {"NVEMBED_DEVICE": "cpu", "NVEMBED_MODEL_DIR": "/b"})
    assert merged == {"device": "cpu", "model_dir": "/b"}


@pytest.mark.parametrize("value", ["0", "-5", "many"])
def test_max_length_must_be_a_positive_integer(value):
    with pytest.raises(SettingsError, match="max_length"):
        EncoderSettings.from_parameters({"model_dir": "/m", "max_length": value})


def test_missing_model_dir_is_named():
    with pytest.raises(SettingsError, match="NVEMBED_MODEL_DIR"):
        EncoderSettings.from_parameters({})


def test_another_model_cannot_answer_as_nv_embed_v2():
    with pytest.raises(SettingsError, match="own name"):
        check_served_name("nv-embed-v2", "BertModel")
    check_served_name("all-minilm-l6-v2", "BertModel")
    check_served_name("nv-embed-v2", "NV-Embed-v2")
