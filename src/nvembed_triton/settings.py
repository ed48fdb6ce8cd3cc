"""Every operator knob, declared once (SETTINGS): its name, default, type, help and environment
variable. The model reads its own from config.pbtxt `parameters` with NVEMBED_* environment
overrides; serve.sh reads its own from flags and the environment. serve.sh's --help and the
configuration table in docs/configuration.md are generated from the same declarations
(tools/reference_tables.py writes the table; the tests check both)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

# Which part of the stack reads a setting.
MODEL = "model"  # the model's config.pbtxt `parameters` (and the setting's environment variable)
LAUNCHER = "serve.sh"  # the launcher only: environment variable or flag
STAND_IN_CONSTANT, STAND_IN_H200 = "constant", "h200"  # the stand_in setting's values (stand_in.py)

DTYPE_NAMES = {
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "fp32": "float32", "float32": "float32", "float": "float32",
}  # fmt: skip


# cpu_engine: what runs an fp32 model's forward pass on a CPU (openvino_runtime.py, cpu_linear.py).
CPU_ENGINE_OPENVINO, CPU_ENGINE_ONEDNN, CPU_ENGINE_TORCH = "openvino", "onednn", "torch"
CPU_ENGINES = (CPU_ENGINE_OPENVINO, CPU_ENGINE_ONEDNN, CPU_ENGINE_TORCH)

GPU_BATCH_TOKENS = 16384  # max_batch_tokens auto, by device (measured: bench/RESULTS.md)
CPU_BATCH_TOKENS = 4096


class SettingsError(ValueError):
    """A configuration that cannot work; the model (or serve.sh) refuses to start and says why."""


def number(convert: Callable[[str], float], smallest: float, what: str) -> Callable[[str], Any]:
    """A parser of numbers of at least `smallest`, whose errors say `what` was expected."""

    def parse(raw: str):
        try:
            value = convert(raw)
        except ValueError:
            raise SettingsError(f"must be {what}, got {raw!r}") from None
        if value < smallest:
            raise SettingsError(f"must be {what}, got {value}")
        return value

    return parse


positive_int = number(int, 1, "a positive integer")
seconds = number(float, 0, "a number of seconds >= 0")
positive_seconds = number(float, 0.1, "a number of seconds >= 0.1")


def auto_or_positive_int(raw: str) -> str | int:
    return "auto" if raw.strip().lower() == "auto" else positive_int(raw)


def stand_in_choice(raw: str) -> str:
    if raw not in ("", STAND_IN_CONSTANT, STAND_IN_H200):
        raise SettingsError(f'must be empty (the real model), "constant" or "h200" (benchmarks only), got {raw!r}')
    return raw


def allocator_choice(raw: str) -> str:
    if raw not in ("auto", "glibc"):
        raise SettingsError(f'must be "auto" or "glibc", got {raw!r}')
    return raw


def cpu_engine_choice(raw: str) -> str:
    if raw not in CPU_ENGINES:
        raise SettingsError(f"must be one of {', '.join(CPU_ENGINES)}, got {raw!r}")
    return raw


PASSES_AUTO, PASSES_PADDED, PASSES_PACKED = "auto", "padded", "packed"


def passes_choice(raw: str) -> str:
    if raw not in (PASSES_AUTO, PASSES_PADDED, PASSES_PACKED):
        raise SettingsError(f"must be one of {PASSES_AUTO}, {PASSES_PADDED}, {PASSES_PACKED}, got {raw!r}")
    return raw


def on_off(raw: str) -> bool:
    if raw.strip().lower() not in ("on", "off"):
        raise SettingsError(f'must be "on" or "off", got {raw!r}')
    return raw.strip().lower() == "on"


def port(raw: str) -> int | None:
    """A TCP port; empty means off (for the optional OpenAI API)."""
    if not raw:
        return None
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise SettingsError(f"must be a port number, got {raw!r}")
    return int(raw)


def gpu_list(raw: str) -> list[int]:
    """ "0,1" -> [0, 1]; empty -> [] (the model config's own instance_group)."""
    try:
        gpus = [int(part) for part in raw.replace(" ", "").split(",") if part]
    except ValueError:
        raise SettingsError(f"must list GPU indices like 0,1; got {raw!r}") from None
    if any(gpu < 0 for gpu in gpus) or len(set(gpus)) != len(gpus):
        raise SettingsError(f"must list distinct GPU indices; got {raw!r}")
    return gpus


@dataclass(frozen=True)
class Setting:
    key: str  # the config.pbtxt parameter key (model settings) and the Python name
    default: str  # as written in config.pbtxt or the environment
    help: str
    scope: str
    parse: Callable[[str], Any] = str
    env: str | None = ""  # "" -> NVEMBED_<KEY>; None -> config.pbtxt only (see the help)
    flag: str | None = None  # serve.sh's command-line flag, which wins over the environment

    @property
    def variable(self) -> str | None:
        return f"NVEMBED_{self.key.upper()}" if self.env == "" else self.env

    def value(self, raw: str, source: str) -> Any:
        try:
            return self.parse(raw)
        except SettingsError as error:
            raise SettingsError(f"{self.key} ({source}) {error}") from None


SETTINGS = (
    Setting("model_dir", "/models/NV-Embed-v2", "the local model snapshot (NV-Embed-v2 or sentence-transformers)",
            MODEL, flag="--model-dir"),
    Setting("device", "cuda:0", "`cpu`, `cuda` or `cuda:N`; an absent GPU is a load error, never a silent CPU "
            "fallback. A KIND_GPU instance uses the GPU Triton gives it", MODEL, flag="--device"),
    Setting("dtype", "auto", "`auto` (fp16 on GPU: the checkpoint's own dtype, far closer to fp32 than bf16, "
            "see bench/RESULTS.md; fp32 on CPU), `bf16`, `fp16` or `fp32`", MODEL),
    Setting("max_length", "32768", "tokens per text, instruction included; longer texts are truncated (or refused, "
            "with the request's truncate NONE)", MODEL, positive_int),
    Setting("max_batch_tokens", "auto", "padded tokens per forward pass: bounds activation memory. `auto`: "
            f"{GPU_BATCH_TOKENS} on GPU (throughput is flat from 8k to 64k on an H200), {CPU_BATCH_TOKENS} on CPU "
            "(smaller passes run faster per text there); see bench/RESULTS.md", MODEL, auto_or_positive_int),
    Setting("cpu_engine", CPU_ENGINE_OPENVINO, "on a CPU: `openvino` runs a sentence-transformers model's "
            "transformer through OpenVINO, converted in memory at load and computed in `dtype` (a lone query "
            "2.3x faster than torch here, batches alike in fp32; bench/RESULTS.md); NV-Embed-v2 and models it "
            "cannot convert run as `onednn`. `onednn` runs torch with fp32 linear layers through oneDNN, weights "
            "packed at load (each checked against torch's own); `torch` runs torch's default kernels", MODEL,
            cpu_engine_choice),
    Setting("cuda_graphs", "on", "on a GPU: `on` captures each small pass shape (up to 2048 padded tokens) as a "
            "CUDA graph at load and replays it, so a lone query is not bound by kernel launches (a failed capture "
            "falls back to eager passes and says so in the log); `off` runs every pass eagerly", MODEL, on_off),
    Setting("passes", PASSES_AUTO, "NV-Embed-v2: how a forward pass holds its texts. `packed`: end to end in one "
            "stream, no padding, each text attending only to itself (varlen flash attention on a GPU); `padded`: "
            "rows padded to the pass's longest, texts of similar length grouped. `auto`: packed on a GPU once a "
            "check at load finds it gives the padded path's vectors (else padded, and the log says why), padded on "
            "a CPU (which has no varlen kernel). Small GPU passes replay CUDA graphs either way", MODEL, passes_choice),
    Setting("compile", "off", "NV-Embed-v2: `on` compiles each layer's dense parts (RMSNorm, the fused "
            "projections, rotary, SwiGLU, residual adds) with torch.compile at load, checked against the eager "
            "layers on a probe; a failed compile or check keeps the eager layers and the log says why. Its cache "
            "goes to TORCHINDUCTOR_CACHE_DIR (serve.sh: the run directory, unless set)", MODEL, on_off),
    Setting("fp8", "off", "NV-Embed-v2, opt-in: `on` runs the backbone's linear layers as FP8 (e4m3) matmuls, "
            "weights quantised per output channel at load, inputs per token (the pooling head stays in `dtype`). "
            "Its fidelity depends on the trained weights: measure it on yours first (python -m "
            "nvembed_triton.engine.fp8_check --model-dir DIR --texts FILE)", MODEL, on_off),
    Setting("pass_log", "", "diagnosis and benchmarks: a file the model appends one JSON line to per forward pass "
            "(rows, tokens, padding, path, GPU and wall time, what its lane held); empty: none", MODEL),
    Setting("stand_in", "", "benchmarks only: `constant` replaces the network with a constant unit vector "
            "(tokenisation and all the plumbing still run) to measure the serving stack's own ceiling; `h200` also "
            "waits, each pass, the time an H200 took for a pass of that size (bench/RESULTS.md); refused under the "
            "name nv-embed-v2", MODEL, stand_in_choice),
    Setting("max_documents", "1024", "most texts per request. config.pbtxt only: clients read it from the "
            "model config (the Python client splits its input by it)", MODEL, positive_int, env=None),
    Setting("max_request_bytes", "16777216", "most UTF-8 bytes of text per request (16 MiB). config.pbtxt "
            "only, as max_documents", MODEL, positive_int, env=None),
    Setting("query_instruction", "", "the prefix queries get; empty: the model's own (NV-Embed-v2: its "
            "retrieval instruction)", MODEL),
    Setting("document_instruction", "", "the prefix documents get; empty: the model's own (NV-Embed-v2: none)",
            MODEL),
    Setting("max_held_requests", "384", "how many requests the model holds at once (being computed or waiting in "
            "its lanes; the long lane half of them); one more is refused at once with UNAVAILABLE, which clients "
            "retry with backoff", MODEL, positive_int),
    Setting("model_repository", "", "the model repository to serve from; empty: the one installed with the "
            "package", LAUNCHER, flag="--model-repository"),
    Setting("host", "127.0.0.1", "the address all ports bind to (the container image sets 0.0.0.0)", LAUNCHER,
            env="TRITON_HOST", flag="--host"),
    Setting("grpc_port", "8001", "Triton's gRPC port", LAUNCHER, port, env="TRITON_GRPC_PORT", flag="--grpc-port"),
    Setting("http_port", "8000", "Triton's HTTP port", LAUNCHER, port, env="TRITON_HTTP_PORT", flag="--http-port"),
    Setting("metrics_port", "8002", "Triton's Prometheus metrics port", LAUNCHER, port, env="TRITON_METRICS_PORT",
            flag="--metrics-port"),
    Setting("openai_port", "", "also serve the OpenAI/NIM-compatible embeddings API on this port; empty: off",
            LAUNCHER, port, flag="--openai-port"),
    Setting("gpus", "", "e.g. `0,1`: one model instance, with its own copy of the weights, per listed GPU; "
            "empty: the model config's instance_group", LAUNCHER, gpu_list),
    Setting("drain_timeout_s", "25", "how long a stop may spend serving accepted requests (inside "
            "Kubernetes' default 30 s grace period)", LAUNCHER, seconds),
    Setting("allocator", "auto", "the malloc of tritonserver and its stubs: `auto` preloads jemalloc where it is installed "
            "(libjemalloc2; under a long mixed load glibc malloc kept growing, bench/RESULTS.md), `glibc` keeps glibc's; "
            "an LD_PRELOAD already set wins", LAUNCHER, allocator_choice),
    Setting("health_interval_s", "5", "how often the supervisor asks tritonserver whether it is live and sends "
            "it a real query (three unanswered liveness checks in a row restart it)", LAUNCHER, positive_seconds),
    Setting("stall_timeout_s", "45", "how long requests may wait while nothing progresses (no request or "
            "forward pass ends and the model uses no CPU) before tritonserver is restarted; the OpenAI front's "
            "readiness says not ready after a third of it. A slow request that computes is never a stall",
            LAUNCHER, positive_seconds),
    Setting("api_key", "", "require `Authorization: Bearer <key>` on the OpenAI/NIM API (health endpoints "
            "excepted); empty: no key", LAUNCHER),
    Setting("inference_key", "", "require the header `nvembed-inference-key: <key>` (gRPC metadata alike) on "
            "inference: the model refuses a request without it; the seed's clients must then send it. Kept off every "
            "command line (in the environment, which only its user can read). Health, metadata, configs and "
            "metrics stay open; empty: no key", LAUNCHER),
)  # fmt: skip
BY_KEY = {setting.key: setting for setting in SETTINGS}


def model_settings(parameters: Mapping[str, str], environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The model's settings: the environment variable, else the config.pbtxt parameter, else the
    default; parsed, with errors naming the setting and where its value came from. Parameters
    that no setting declares are refused: a misspelt key must not be silently ignored. Upper-case
    keys belong to the Python backend itself (EXECUTION_ENV_PATH, FORCE_CPU_ONLY_INPUT_TENSORS, ...)."""
    ours = [key for key in parameters if not key.isupper()]
    unknown = sorted(key for key in ours if key not in BY_KEY or BY_KEY[key].scope != MODEL)
    if unknown:
        known = ", ".join(s.key for s in SETTINGS if s.scope == MODEL)
        raise SettingsError(f"unknown config.pbtxt parameter(s) {', '.join(unknown)}; the model takes {known}")
    values = {}
    for setting in (s for s in SETTINGS if s.scope == MODEL):
        if setting.variable and environ.get(setting.variable):
            values[setting.key] = setting.value(environ[setting.variable], setting.variable)
        elif parameters.get(setting.key):
            values[setting.key] = setting.value(parameters[setting.key], "config.pbtxt")
        else:
            values[setting.key] = setting.value(setting.default, "default")
    return values


def launcher_setting(key: str, environ: Mapping[str, str] = os.environ, flag_value: Any = None) -> Any:
    """A serve.sh setting: its flag, else its environment variable, else its default."""
    setting = BY_KEY[key]
    if flag_value not in (None, ""):
        return setting.value(str(flag_value), setting.flag or "flag")
    if setting.variable and environ.get(setting.variable):
        return setting.value(environ[setting.variable], setting.variable)
    return setting.value(setting.default, "default")


def triton_parameters(model_config: Mapping) -> dict[str, str]:
    """config.pbtxt `parameters { key: K value { string_value: V } }` as a plain dict."""
    return {key: value["string_value"] for key, value in model_config.get("parameters", {}).items()}


@dataclass(frozen=True)
class EncoderSettings:
    model_dir: str
    device: str  # "cpu" or "cuda:N"
    dtype: str  # a torch dtype name
    max_length: int
    max_batch_tokens: int
    stand_in: str = ""  # "constant" or "h200": benchmarks only (stand_in.py)
    cpu_engine: str = CPU_ENGINE_OPENVINO  # what runs an fp32 forward pass on a CPU (openvino_runtime.py, cpu_linear.py)
    cuda_graphs: bool = True  # small GPU passes replayed from CUDA graphs (cuda_graphs.py)
    passes: str = PASSES_AUTO  # packed or padded passes (packing.py)
    compile: bool = False  # the layers' dense parts through torch.compile (compiled.py)
    fp8: bool = False  # the backbone's linear layers as FP8 matmuls (fp8.py)

    @classmethod
    def from_parameters(
        cls,
        parameters: Mapping[str, str],
        instance_kind: str = "",
        instance_device_id: str = "0",
        environ: Mapping[str, str] | None = None,
    ) -> EncoderSettings:
        """From config.pbtxt-style parameters, and `environ`'s overrides when given (tests and
        benchmarks pass none, so a deployment's NVEMBED_* variables cannot leak into them)."""
        return cls.from_settings(model_settings(parameters, environ or {}), instance_kind, instance_device_id)

    @classmethod
    def from_settings(cls, values: Mapping[str, Any], instance_kind: str = "", instance_device_id: str = "0") -> EncoderSettings:
        """From the model's settings (model_settings) and the instance Triton made."""
        device = resolve_device(values["device"], instance_kind, instance_device_id)
        return cls(
            model_dir=values["model_dir"],
            device=device,
            dtype=resolve_dtype(values["dtype"], device),
            max_length=values["max_length"],
            max_batch_tokens=resolve_batch_tokens(values["max_batch_tokens"], device),
            stand_in=values["stand_in"],
            cpu_engine=values["cpu_engine"],
            cuda_graphs=values["cuda_graphs"],
            passes=values["passes"],
            compile=values["compile"],
            fp8=values["fp8"],
        )


def resolve_device(requested: str, instance_kind: str, instance_device_id: str) -> str:
    """The device to load on. A KIND_GPU instance uses the GPU Triton gave it; "cuda" alone means
    cuda:0. Whether that GPU exists is checked by check_device_available, at load time."""
    requested = requested.strip().lower()
    if instance_kind.upper() in ("GPU", "KIND_GPU"):
        if requested == "cpu":
            raise SettingsError('instance_group is KIND_GPU but parameter device is "cpu"; use KIND_CPU to run on the CPU')
        return f"cuda:{instance_device_id}"
    if requested == "cpu":
        return "cpu"
    if requested == "cuda":
        return "cuda:0"
    if requested.startswith("cuda:") and requested[5:].isdigit():
        return requested
    raise SettingsError(f'parameter device must be "cpu", "cuda" or "cuda:N", got {requested!r}')


def resolve_batch_tokens(requested: str | int, device: str) -> int:
    if requested == "auto":
        return CPU_BATCH_TOKENS if device == "cpu" else GPU_BATCH_TOKENS
    return requested


def resolve_dtype(requested: str, device: str) -> str:
    """float16 on GPUs: NV-Embed-v2 is published in fp16 and measured at full size it stays far
    closer to fp32 than bf16 does, for a few percent of throughput (bench/RESULTS.md). float32 on CPUs
    (16-bit matmuls are slow on most CPUs)."""
    requested = requested.strip().lower()
    if requested == "auto":
        return "float32" if device == "cpu" else "float16"
    if requested not in DTYPE_NAMES:
        raise SettingsError(f"parameter dtype must be one of auto, bf16, fp16, fp32, got {requested!r}")
    return DTYPE_NAMES[requested]


# ---- serve.sh --help, generated from SETTINGS (docs/configuration.md's table: tools/reference_tables.py) ----


def _shown_default(setting: Setting) -> str:
    return setting.default or "(empty)"


def environment_help() -> str:
    """serve.sh --help's epilog: every environment variable, its default and meaning."""
    lines = ["environment (flags win over these):"]
    for setting in (s for s in SETTINGS if s.variable):
        where = "" if setting.scope == LAUNCHER else f" [{setting.key} in the model's config.pbtxt]"
        lines.append(f"  {setting.variable}  default {_shown_default(setting)}{where}")
        lines.append(f"      {setting.help.replace('`', '')}")
    return "\n".join(lines)
