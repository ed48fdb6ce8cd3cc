"""Session fixtures: a tiny random NV-Embed-v2 checkpoint, and real tritonservers started through
serve.sh on free ports (CPU). A server's log is printed when a test using it fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from nvembed_triton.launcher.serve import DEMO_MODEL, PACKAGED_REPOSITORY, demo_model_dir
from nvembed_triton.launcher.server import ServerError, free_port, interrupt, log_tail, wait_until_ready
from nvembed_triton.protocol.contract import PUBLIC_MODEL
from nvembed_triton.testing.tiny_checkpoint import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SERVE_SH = ROOT / "serve.sh"
# The test server truncates at this many tokens, so truncation is tested without 32k-token inputs.
TEST_MAX_LENGTH = 256
STARTUP_TIMEOUT_S = 300


@dataclass
class RunningServer:
    model: str
    url: str
    log_path: Path
    process: subprocess.Popen
    http_port: int
    metrics_port: int
    console_path: Path  # serve.sh's own output
    openai_port: int  # the OpenAI/NIM-compatible API every test server also serves

    @property
    def openai_url(self) -> str:
        return f"http://127.0.0.1:{self.openai_port}/v1"

    def client(self) -> grpcclient.InferenceServerClient:
        return grpcclient.InferenceServerClient(self.url)

    def log_tail(self, lines: int = 80) -> str:
        return log_tail(self.log_path, lines)

    def is_healthy(self) -> bool:
        with self.client() as client:
            return self.process.poll() is None and client.is_server_live() and client.is_model_ready(self.model)


PORT_ATTEMPTS = 3  # free_port() races with every other process's ephemeral ports: pick again if one is taken


def start_server(tmp: Path, model: str, args: list[str], extra_env: dict[str, str]) -> RunningServer:
    for _ in range(PORT_ATTEMPTS - 1):
        try:
            return _start_server(tmp, model, args, extra_env)
        except PortTakenError:
            continue
    return _start_server(tmp, model, args, extra_env)


class PortTakenError(RuntimeError):
    """serve.sh refused a port that was free when the test picked it."""


def _start_server(tmp: Path, model: str, args: list[str], extra_env: dict[str, str]) -> RunningServer:
    grpc_port, http_port, metrics_port, openai_port = free_port(), free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "TRITON_GRPC_PORT": str(grpc_port),
        "TRITON_HTTP_PORT": str(http_port),
        "TRITON_METRICS_PORT": str(metrics_port),
        "NVEMBED_OPENAI_PORT": str(openai_port),
        "PYTHON": sys.executable,
        **extra_env,
    }
    run_dir = tmp / "run"
    console = open(tmp / "serve.out", "wb")
    process = subprocess.Popen(
        [str(SERVE_SH), "--run-dir", str(run_dir), *args], env=env, stdout=console, stderr=subprocess.STDOUT
    )
    server = RunningServer(
        model, f"127.0.0.1:{grpc_port}", run_dir / "tritonserver.log", process, http_port, metrics_port, tmp / "serve.out",
        openai_port,
    )  # fmt: skip
    try:
        wait_until_ready(server.url, (model,), process, server.log_path, STARTUP_TIMEOUT_S)
    except ServerError as error:
        stop_server(server)
        output = server.console_path.read_text()
        if "that cannot be used; nothing was started" in output:
            raise PortTakenError(output) from None
        raise RuntimeError(f"{error}\nserve.sh's output:\n{output}") from None
    return server


def stop_server(server: RunningServer) -> None:
    interrupt(server.process, grace_s=60)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-nvembed"), seed=0)


def start_tiny_server(tmp: Path, tiny_checkpoint: Path) -> RunningServer:
    """serve.sh with the tiny NV-Embed-v2 checkpoint on the CPU, truncating at TEST_MAX_LENGTH."""
    env = {"NVEMBED_MODEL_DIR": str(tiny_checkpoint), "NVEMBED_MAX_LENGTH": str(TEST_MAX_LENGTH)}
    return start_server(tmp, PUBLIC_MODEL, ["--device", "cpu"], env)


@pytest.fixture(scope="session")
def nvembed_server(tmp_path_factory, tiny_checkpoint) -> RunningServer:
    server = start_tiny_server(tmp_path_factory.mktemp("nvembed-server"), tiny_checkpoint)
    yield server
    stop_server(server)


SMALL_HELD = 8  # the requests small_capacity_server's model holds (max_held_requests); its long lane holds half


@pytest.fixture(scope="session")
def small_capacity_server(tmp_path_factory, tiny_checkpoint) -> RunningServer:
    """The shipped repository with the model holding SMALL_HELD requests."""
    tmp = tmp_path_factory.mktemp("small-capacity")
    repository = shutil.copytree(PACKAGED_REPOSITORY, tmp / "repository", ignore=shutil.ignore_patterns("__pycache__"))
    config = repository / PUBLIC_MODEL / "config.pbtxt"
    held = f'parameters {{ key: "max_held_requests" value {{ string_value: "{SMALL_HELD}" }} }}\n'
    config.write_text(config.read_text() + held)
    env = {"NVEMBED_MODEL_DIR": str(tiny_checkpoint), "NVEMBED_MAX_LENGTH": str(TEST_MAX_LENGTH)}
    server = start_server(tmp, PUBLIC_MODEL, ["--device", "cpu", "--model-repository", str(repository)], env)
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def minilm_server(tmp_path_factory) -> RunningServer:
    server = start_server(
        tmp_path_factory.mktemp("minilm-server"),
        DEMO_MODEL,
        ["--name", DEMO_MODEL, "--model-dir", str(demo_model_dir()), "--device", "cpu"],
        {},
    )
    yield server
    stop_server(server)


SERVER_FIXTURES = {"nvembed_server", "minilm_server", "small_capacity_server"}


def pytest_collection_modifyitems(items):
    """Tests that use a shared server are server tests wherever they live (files that start servers
    of their own say so with pytestmark): `pytest -m "not server"` runs the unit tests alone."""
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.server)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Print the server log under a failing test that used a server."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for name in ("nvembed_server", "minilm_server"):
            server = item.funcargs.get(name)
            if isinstance(server, RunningServer):
                report.sections.append((f"{name} log (tail)", server.log_tail()))
