"""Settings: each knob is declared once (settings.SETTINGS); the environment overrides and serve.sh's
--help follow from the declaration."""

from pathlib import Path

import pytest

from nvembed_triton import settings
from nvembed_triton.engine.checkpoint import Architecture, CheckpointError, check_served_name
from nvembed_triton.launcher import serve
from nvembed_triton.settings import (
    LAUNCHER,
    MODEL,
    SETTINGS,
    EncoderSettings,
    Setting,
    SettingsError,
    launcher_setting,
    model_settings,
    positive_int,
    resolve_device,
    resolve_dtype,
)

ROOT = Path(__file__).resolve().parents[2]


def test_defaults():
    encoder = EncoderSettings.from_parameters({}, environ={})
    assert encoder.model_dir == "/models/NV-Embed-v2"
    assert encoder.device == "cuda:0"  # as in the user's README
    assert encoder.dtype == "float16"
    assert encoder.max_length == 32768
    assert encoder.max_batch_tokens == 16384


def test_cpu_defaults_to_float32_and_smaller_passes():
    encoder = EncoderSettings.from_parameters({"device": "cpu"}, environ={})
    assert encoder.dtype == "float32" and encoder.max_batch_tokens == 4096
    assert EncoderSettings.from_parameters({"device": "cpu", "max_batch_tokens": "8192"}, environ={}).max_batch_tokens == 8192


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


def test_environment_wins_over_config_which_wins_over_the_default():
    values = model_settings({"device": "cuda:1", "model_dir": "/a"}, {"NVEMBED_DEVICE": "cpu"})
    assert values["device"] == "cpu"  # environment
    assert values["model_dir"] == "/a"  # config.pbtxt
    assert values["max_length"] == 32768  # default


@pytest.mark.parametrize("value", ["0", "-5", "many"])
def test_max_length_must_be_a_positive_integer(value):
    with pytest.raises(SettingsError, match=r"max_length \(config.pbtxt\) must be a positive integer"):
        EncoderSettings.from_parameters({"max_length": value}, environ={})


def test_a_bad_environment_value_names_its_variable():
    with pytest.raises(SettingsError, match=r"max_batch_tokens \(NVEMBED_MAX_BATCH_TOKENS\)"):
        model_settings({}, {"NVEMBED_MAX_BATCH_TOKENS": "lots"})


def test_a_misspelt_config_parameter_is_refused_not_ignored():
    with pytest.raises(SettingsError, match="unknown config.pbtxt parameter.*max_lenght"):
        model_settings({"max_lenght": "512"}, {})
    with pytest.raises(SettingsError, match="unknown config.pbtxt parameter.*grpc_port"):  # serve.sh's, not the model's
        model_settings({"grpc_port": "9001"}, {})


def test_request_limits_are_read_from_config_only():
    """Clients read them from the model config, so an environment variable must not change them."""
    values = model_settings({"max_documents": "8"}, {"NVEMBED_MAX_DOCUMENTS": "99"})
    assert values["max_documents"] == 8


def test_launcher_flag_wins_over_environment_over_default():
    assert launcher_setting("host", {}) == "127.0.0.1"
    assert launcher_setting("host", {"TRITON_HOST": "0.0.0.0"}) == "0.0.0.0"
    assert launcher_setting("host", {"TRITON_HOST": "0.0.0.0"}, "::1") == "::1"
    assert launcher_setting("gpus", {"NVEMBED_GPUS": "0, 2"}) == [0, 2]
    with pytest.raises(SettingsError, match=r"openai_port \(--openai-port\) must be a port number"):
        launcher_setting("openai_port", {}, "http")
    with pytest.raises(SettingsError, match="distinct"):
        launcher_setting("gpus", {"NVEMBED_GPUS": "1,1"})


def test_every_setting_has_a_parser_that_accepts_its_default():
    for setting in SETTINGS:
        setting.value(setting.default, "default")


def help_text() -> str:
    return serve.parser().format_help()


def test_help_follows_the_declarations():
    """Every declared setting is in serve.sh --help: its variable, default and flag."""
    text = help_text()
    for setting in SETTINGS:
        if setting.variable:
            assert setting.variable in text and f"default {setting.default or '(empty)'}" in text
        if setting.flag:
            assert setting.flag in text


def test_a_new_knob_is_one_declaration(monkeypatch):
    """Adding a Setting is all it takes: the model reads it with its environment override, and
    --help shows it (docs/configuration.md's table: test_reference_tables.py)."""
    knob = Setting("pooling_threads", "4", "threads for the pooling head", MODEL, positive_int)
    launcher_knob = Setting("probe_interval_s", "5", "seconds between health probes", LAUNCHER, settings.seconds,
                            env="NVEMBED_PROBE_EVERY", flag="--probe-interval")  # fmt: skip
    declared = (*SETTINGS, knob, launcher_knob)
    monkeypatch.setattr(settings, "SETTINGS", declared)
    monkeypatch.setattr(serve, "SETTINGS", declared)
    monkeypatch.setattr(settings, "BY_KEY", {s.key: s for s in declared})
    assert model_settings({}, {})["pooling_threads"] == 4
    assert model_settings({"pooling_threads": "2"}, {})["pooling_threads"] == 2
    assert model_settings({"pooling_threads": "2"}, {"NVEMBED_POOLING_THREADS": "8"})["pooling_threads"] == 8
    assert launcher_setting("probe_interval_s", {"NVEMBED_PROBE_EVERY": "2.5"}) == 2.5
    text = help_text()
    assert "NVEMBED_POOLING_THREADS  default 4" in text and "threads for the pooling head" in text
    assert "--probe-interval" in text and "NVEMBED_PROBE_EVERY" in text
    assert serve.parser().parse_args(["--probe-interval", "3"]).probe_interval_s == "3"


def test_setting_keys_are_unique_and_variables_distinct():
    assert len({s.key for s in SETTINGS}) == len(SETTINGS)
    variables = [s.variable for s in SETTINGS if s.variable]
    assert len(set(variables)) == len(variables)


def test_another_model_cannot_answer_as_nv_embed_v2():
    with pytest.raises(CheckpointError, match="own name"):
        check_served_name("nv-embed-v2", Architecture.SENTENCE_TRANSFORMERS)
    check_served_name("all-minilm-l6-v2", Architecture.SENTENCE_TRANSFORMERS)
    check_served_name("nv-embed-v2", Architecture.NV_EMBED_V2)


def test_the_python_backends_own_parameters_pass():
    values = model_settings({"FORCE_CPU_ONLY_INPUT_TENSORS": "no", "EXECUTION_ENV_PATH": "/env.tar.gz"}, {})
    assert "FORCE_CPU_ONLY_INPUT_TENSORS" not in values and values["max_length"] == 32768


def repository_with(tmp_path, **parameters_by_model) -> Path:
    """A copy of the shipped repository with parameters added to the named models' configs."""
    import shutil

    repository = Path(shutil.copytree(serve.PACKAGED_REPOSITORY, tmp_path / "repository"))
    for model, parameters in parameters_by_model.items():
        with open(repository / model.replace("_", "-") / "config.pbtxt", "a") as config:
            for key, value in parameters.items():
                config.write(f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}\n')
    return repository


def plan_for(tiny_checkpoint, repository, environ=None):
    args = ["--model-dir", str(tiny_checkpoint), "--model-repository", str(repository)]
    return serve.plan(serve.parser().parse_args(args), environ or {})


@pytest.mark.parametrize(
    "environ,message",
    [
        ({"NVEMBED_MAX_LENGTH": "lots"}, r"max_length \(NVEMBED_MAX_LENGTH\)"),
        ({"NVEMBED_DRAIN_TIMEOUT_S": "25s"}, r"drain_timeout_s \(NVEMBED_DRAIN_TIMEOUT_S\)"),
        ({"NVEMBED_QUERY_INSTRUCTION": "q: ", "NVEMBED_DTYPE": "auto", "NVEMBED_STAND_IN": "zeros"}, "stand_in"),
    ],
)
def test_serve_checks_every_setting_before_anything_starts(tiny_checkpoint, tmp_path, environ, message):
    with pytest.raises(SettingsError, match=message):
        plan_for(tiny_checkpoint, serve.PACKAGED_REPOSITORY, environ)


def test_a_misspelt_config_parameter_stops_serve_before_it_starts(tiny_checkpoint, tmp_path):
    repository = repository_with(tmp_path, nv_embed_v2={"max_lenght": "512"})
    with pytest.raises(SettingsError, match="max_lenght"):
        plan_for(tiny_checkpoint, repository)
