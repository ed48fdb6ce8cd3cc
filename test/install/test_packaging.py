"""Files a user runs directly: the Dockerfile (linted here; built and run by tools/image_check.py
after the suite) and serve.sh's early, explicit failures."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from nvembed_triton.protocol.contract import PUBLIC_MODEL

ROOT = Path(__file__).resolve().parents[2]


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_ships_nvidias_base_and_runs_unprivileged():
    """tools/image_check.py builds on a stand-in through BASE_IMAGE; what ships is NVIDIA's."""
    assert dockerfile_value(r"ARG BASE_IMAGE=(\S+)") == "nvcr.io/nvidia/tritonserver:24.11-py3"
    assert dockerfile_value(r"(?m)^FROM (\S+)$") == "${BASE_IMAGE}"
    assert dockerfile_value(r"(?m)^USER (\S+)$") == "1000:1000"


def dockerfile_value(pattern: str) -> str:
    match = re.search(pattern, (ROOT / "Dockerfile").read_text())
    assert match, pattern
    return match.group(1)


def requirements_of(extras: list[str]) -> list[str]:
    """The package's requirements with these extras, its extras that name other extras expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found, pending = list(project["dependencies"]), list(extras)
    while pending:
        for requirement in project["optional-dependencies"][pending.pop()]:
            if requirement.startswith("nvembed-triton["):
                pending += requirement.split("[", 1)[1].rstrip("]").split(",")
            elif requirement not in found:
                found.append(requirement)
    return found


def image_requirements() -> list[str]:
    """What the Dockerfile's pip installs: torch at its pin, and the package with its extras."""
    extras = dockerfile_value(r'pip install --no-cache-dir "\.\[([^\]]+)\]"').split(",")
    return [dockerfile_value(r'"(torch==[^"]+)"'), *requirements_of(extras)]


def resolve_for(python_version: str) -> subprocess.CompletedProcess:
    """pip's resolver on the image's platform (Ubuntu 24.04: glibc 2.39, x86-64), from package
    metadata only: nothing is installed and no CUDA wheel is downloaded."""
    platforms = ["--platform=manylinux2014_x86_64"] + [f"--platform=manylinux_2_{minor}_x86_64" for minor in range(17, 40)]
    return subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--only-binary=:all:",
         f"--python-version={python_version}", "--implementation=cp", f"--abi=cp{python_version.replace('.', '')}",
         *platforms, "--target", str(ROOT / "build" / "none"),
         *image_requirements()],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.install  # resolves against the package index
def test_the_image_can_install_the_dependencies_for_its_python():
    """The Dockerfile's pip step can succeed on the base image's Python; on 24.10's Python 3.10 it
    could not (transformers 5 needs 3.11), which this check also sees."""
    python = dockerfile_value(r"ARG IMAGE_PYTHON=(\S+)")
    result = resolve_for(python)
    assert result.returncode == 0, result.stderr[-3000:]
    old = resolve_for("3.10")
    assert old.returncode != 0 and "Requires-Python" in old.stderr + old.stdout


def test_torch_is_pinned_alike_wherever_it_is_installed():
    setup_pin = re.search(r'"(torch==[^"]+)"', (ROOT / "setup.sh").read_text()).group(1)
    package_pin = next(requirement for requirement in requirements_of(["engine"]) if requirement.startswith("torch"))
    assert dockerfile_value(r'"(torch==[^"]+)"') == setup_pin == package_pin.split()[0]


def test_the_image_installs_what_serving_in_the_triton_container_needs():
    """The serving extra (torch, the launcher's and the OpenAI API's needs), not the bundled
    tritonserver: the image has NVIDIA's own."""
    requirements = image_requirements()
    assert any(r.startswith("fastapi") for r in requirements) and any(r.startswith("transformers") for r in requirements)
    assert not any(r.startswith("nvidia-pytriton") for r in requirements)


def test_the_build_context_holds_what_the_image_copies_and_nothing_else():
    """The context docker would send (docker-py's own .dockerignore matching): every COPY source
    of the Dockerfile is in it; local environments, git and caches are not."""
    from docker.utils.build import exclude_paths

    patterns = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    context = exclude_paths(str(ROOT), patterns, "Dockerfile")
    copied = [line.split()[1:-1] for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")]
    for source in (source for sources in copied for source in sources):
        assert source in context or any(path.startswith(source.rstrip("/") + "/") for path in context), source
    assert "src/nvembed_triton/model/model_repository/nv-embed-v2/1/model.py" in context
    unwanted = [p for p in context if p.split("/")[0] in (".venv", ".git", "bench", "test") or "__pycache__" in p]
    assert not unwanted, unwanted[:5]
    assert sum((ROOT / p).stat().st_size for p in context if (ROOT / p).is_file()) < 2**21  # a few hundred KB of source


def serve(*args, **env):
    return subprocess.run(
        [str(ROOT / "serve.sh"), *args],
        env={**os.environ, "PYTHON": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_help_lists_the_knobs():
    result = serve("--help")
    assert result.returncode == 0
    for knob in (
        "--model-dir",
        "--device",
        "NVEMBED_MODEL_DIR",
        "NVEMBED_DEVICE",
        "TRITON_GRPC_PORT",
        "TRITON_HTTP_PORT",
        "TRITON_METRICS_PORT",
    ):
        assert knob in result.stdout


def test_absent_model_directory_fails_early_with_how_to_get_it(tmp_path):
    result = serve(NVEMBED_MODEL_DIR=str(tmp_path / "missing"))
    assert result.returncode == 1
    assert "does not exist" in result.stderr and "huggingface-cli download nvidia/NV-Embed-v2" in result.stderr
    assert "./demo.sh" in result.stderr


def test_incomplete_snapshot_names_the_missing_files(tiny_checkpoint, tmp_path):
    partial = shutil.copytree(tiny_checkpoint, tmp_path / "partial")
    (partial / "tokenizer.json").unlink()
    result = serve("--model-dir", str(partial))
    assert result.returncode == 1 and "missing tokenizer.json" in result.stderr


def test_another_model_is_never_served_as_nv_embed_v2():
    from nvembed_triton.launcher.serve import demo_model_dir

    result = serve("--model-dir", str(demo_model_dir()))
    assert result.returncode == 1 and "cannot be served as 'nv-embed-v2'" in result.stderr


@pytest.mark.parametrize("device", ["gpu0", "cuda:first"])
def test_malformed_device_fails_before_the_server_starts(tiny_checkpoint, device):
    result = serve("--model-dir", str(tiny_checkpoint), "--device", device, "--check")
    assert result.returncode == 1 and "cuda:N" in result.stderr


@pytest.mark.server  # starts a real tritonserver
def test_gpu_asked_for_but_absent_is_refused_never_a_cpu_fallback(tiny_checkpoint, tmp_path):
    """serve.sh refuses before it starts anything (test_newcomer times it); a tritonserver started
    without serve.sh still refuses at load, by the model's own check."""
    from conftest import free_port

    from nvembed_triton.launcher.serve import PACKAGED_REPOSITORY
    from nvembed_triton.launcher.server import ServerError, ServerSettings, TritonServer

    ports = {f"TRITON_{kind}_PORT": str(free_port()) for kind in ("GRPC", "HTTP", "METRICS")}
    result = serve("--model-dir", str(tiny_checkpoint), "--device", "cuda:0", CUDA_VISIBLE_DEVICES="", **ports)
    assert result.returncode == 1 and "starting tritonserver" not in result.stdout
    assert "the device is cuda:0, but" in result.stderr and "--device cpu" in result.stderr
    # The shipped repository in a tritonserver of its own.
    environment = {"NVEMBED_MODEL_DIR": str(tiny_checkpoint), "NVEMBED_DEVICE": "cuda:0", "CUDA_VISIBLE_DEVICES": ""}
    settings = ServerSettings(PACKAGED_REPOSITORY, (PUBLIC_MODEL,), tmp_path / "run", free_port(), free_port(), free_port(),
                              environment=environment)  # fmt: skip
    with pytest.raises(ServerError, match=r"device cuda:0 was asked for but torch sees 0 CUDA device\(s\)"):
        with TritonServer(settings):
            pass


def test_a_port_in_use_is_named_before_anything_loads(tiny_checkpoint):
    """Found before the weights load (which takes minutes with the real ones), naming the variable."""
    import socket

    from conftest import free_port

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = {"TRITON_GRPC_PORT": str(free_port()), "TRITON_HTTP_PORT": str(taken.getsockname()[1])}
        ports["TRITON_METRICS_PORT"] = str(free_port())
        result = subprocess.run(
            [str(ROOT / "serve.sh"), "--model-dir", str(tiny_checkpoint), "--device", "cpu"],
            env={**os.environ, "PYTHON": sys.executable, **ports},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert f"port {ports['TRITON_HTTP_PORT']}" in result.stderr and "TRITON_HTTP_PORT" in result.stderr
    assert "starting tritonserver" not in result.stdout


@pytest.mark.server  # starts a real tritonserver
def test_a_temporary_run_directory_is_removed_on_exit(tiny_checkpoint, tmp_path):
    """serve.sh starts tritonserver, whose model fails to load (its model.py raises): it exits
    and leaves no temporary run directory."""
    import tempfile

    from conftest import free_port

    from nvembed_triton.launcher.serve import PACKAGED_REPOSITORY

    repository = shutil.copytree(PACKAGED_REPOSITORY, tmp_path / "repository", ignore=shutil.ignore_patterns("__pycache__"))
    (repository / PUBLIC_MODEL / "1" / "model.py").write_text(
        "class TritonPythonModel:\n    def initialize(self, args):\n        raise RuntimeError('fails to load on purpose')\n"
    )
    ports = {f"TRITON_{kind}_PORT": str(free_port()) for kind in ("GRPC", "HTTP", "METRICS")}
    before = set(Path(tempfile.gettempdir()).glob("nvembed-triton-*"))
    result = serve("--model-dir", str(tiny_checkpoint), "--device", "cpu", "--model-repository", str(repository), **ports)
    assert result.returncode == 1 and "starting tritonserver" in result.stdout  # started, failed to load
    assert "fails to load on purpose" in result.stderr
    assert set(Path(tempfile.gettempdir()).glob("nvembed-triton-*")) == before


def test_a_non_editable_install_serves_without_the_checkout(tiny_checkpoint, nvembed_server, tmp_path):
    """The wheel as the Dockerfile installs it (`pip install .`, not editable), in a fresh venv
    whose only link to this environment is its dependencies: its console script, run outside the
    checkout, serves the tiny checkpoint from the model repository the wheel ships."""
    from conftest import free_port
    from grpc_helpers import cosine, embed_query

    from nvembed_triton.launcher.server import interrupt, wait_until_ready

    wheels, venv = tmp_path / "wheels", tmp_path / "venv"
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, ROOT]
    subprocess.run(build, check=True, cwd=tmp_path)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    python = venv / "bin" / "python"

    def run_python(code: str) -> str:
        return subprocess.check_output([python, "-c", code], text=True, cwd=tmp_path).strip()

    site = Path(run_python("import sysconfig; print(sysconfig.get_path('purelib'))"))
    # The dependencies (torch & co.) from this environment, by path: its .pth files (the editable
    # install's finder among them) are not run, so nvembed_triton can only come from the wheel.
    dependencies = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "torch").is_dir())
    (site / "dependencies.pth").write_text(dependencies + "\n")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", next(wheels.glob("*.whl"))], check=True)
    repository = run_python("from nvembed_triton.launcher.serve import PACKAGED_REPOSITORY as r; print(r if r.is_dir() else '')")
    assert repository.startswith(str(site)), repository

    ports = {f"TRITON_{kind}_PORT": str(free_port()) for kind in ("GRPC", "HTTP", "METRICS")}
    environment = {**os.environ, **ports, "NVEMBED_MAX_LENGTH": "256", "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    run_dir = tmp_path / "run"
    command = [venv / "bin" / "nvembed-triton-serve", "--model-dir", tiny_checkpoint, "--device", "cpu", "--run-dir", run_dir]
    with open(tmp_path / "serve.out", "wb") as console:
        process = subprocess.Popen(command, cwd=tmp_path, env=environment, stdout=console, stderr=subprocess.STDOUT)
    url = f"127.0.0.1:{ports['TRITON_GRPC_PORT']}"
    try:
        wait_until_ready(url, (PUBLIC_MODEL,), process, run_dir / "tritonserver.log")
        with grpcclient.InferenceServerClient(url) as client:
            served = embed_query(client, PUBLIC_MODEL, "installed, not checked out")
    finally:
        code = interrupt(process, grace_s=60)
    with nvembed_server.client() as client:
        expected = embed_query(client, PUBLIC_MODEL, "installed, not checked out")
    assert cosine(served, expected)[0] > 0.99999
    assert code == 0, (tmp_path / "serve.out").read_text()  # and it stopped cleanly


def test_the_response_cache_is_off_unless_a_benchmark_asks(tmp_path):
    """Its key omits request parameters (docs/configuration.md), so only bench_plumbing turns it on."""
    from nvembed_triton.launcher.server import ServerSettings, TritonServer, pytriton_installation

    installation = pytriton_installation(tmp_path)
    plain = ServerSettings(model_repository=tmp_path, models=(), run_dir=tmp_path)
    assert not [a for a in TritonServer(plain).command(installation) if a.startswith("--cache")]
    cached = TritonServer(ServerSettings(model_repository=tmp_path, models=(), run_dir=tmp_path, response_cache_bytes=2**20))
    command = cached.command(installation)
    assert "--cache-config=local,size=1048576" in command
    assert f"--cache-directory={installation.cache_directory}" in command
    assert (installation.cache_directory / "local" / "libtritoncache_local.so").is_file()
    shipped = (ROOT / "src/nvembed_triton/model/model_repository/nv-embed-v2/config.pbtxt").read_text()
    assert "response_cache" not in shipped
