"""Running a real tritonserver as a child process: the Triton container's own, or on a plain
machine the one bundled in the nvidia-pytriton wheel, whose Python backend folder is assembled here."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nvembed_triton.launcher.leftovers import remove_regions
from nvembed_triton.launcher.memory import shm_arguments
from nvembed_triton.protocol.contract import INFERENCE_KEY_HEADER
from nvembed_triton.settings import BY_KEY

CONTAINER_TRITON = Path("/opt/tritonserver")
# Only inference, health, metadata, model configs (clients read their limits there) and metrics stay
# open: registering shared memory lets a client write into the backend's own regions (and hang or
# crash tritonserver), logging can silence or flood the log, and the rest is administration. These are
# closed to every client: Triton 2.51 takes a restricted API's key only on its command line
# (command_line_parser.cc), which every local user can read, so the key is one no client can send: it
# holds a line feed, which neither an HTTP header nor gRPC metadata can carry.
RESTRICTED_APIS = ("shared-memory", "model-repository", "statistics", "trace", "logging")
CLOSED_HEADER = "nvembed-closed"
# With the inference_key setting, Triton forwards this header to the model as a request parameter
# (its header-forward pattern); the model compares it with the key in its environment.
FORWARDED_HEADERS = f"^{INFERENCE_KEY_HEADER}$"
PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")


class ServerError(RuntimeError):
    """tritonserver could not be found, started or made ready; the message includes its log tail."""


@dataclass(frozen=True)
class TritonInstallation:
    binary: Path
    backend_directory: Path
    environment: dict[str, str] = field(default_factory=dict)  # extra variables the server needs
    cache_directory: Path | None = None  # response-cache libraries, where not Triton's default place


def container_installation() -> TritonInstallation | None:
    binary = shutil.which("tritonserver") or (CONTAINER_TRITON / "bin" / "tritonserver")
    binary = Path(binary)
    backends = binary.parent.parent / "backends"
    if binary.is_file() and (backends / "python").is_dir():
        return TritonInstallation(binary, backends)
    return None


def pytriton_installation(run_dir: Path) -> TritonInstallation:
    """The wheel ships the server, the Python backend and one stub per Python version; the backend
    folder Triton expects is assembled under run_dir with the stub of the running interpreter."""
    # Found, not imported: importing pytriton pulls in its own clients (zmq, gevent, ...), none used here.
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError(
            "no tritonserver found: not in the Triton container (/opt/tritonserver) and the "
            "nvidia-pytriton wheel is not installed (pip install 'nvembed-triton[server]')"
        )
    package = Path(spec.submodule_search_locations[0])
    wheel = package / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = wheel / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton has no Python-backend stub for Python {version} ({stub})")
    backend = run_dir / "backends" / "python"
    backend.mkdir(parents=True, exist_ok=True)
    for source in [wheel / "backends" / "python" / name for name in PYTHON_BACKEND_FILES] + [stub]:
        target = backend / source.name
        if not target.exists():
            shutil.copy2(source, target)
    libraries = [package.parent / "nvidia_pytriton.libs", Path(sysconfig.get_config_var("LIBDIR"))]
    return TritonInstallation(
        wheel / "bin" / "tritonserver",
        run_dir / "backends",
        {
            # The stub embeds Python and finds its prefix (so this environment's packages) by
            # looking up python3 on PATH; it needs libpython and the wheel's bundled libraries.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "LD_LIBRARY_PATH": os.pathsep.join([str(p) for p in libraries] + [os.environ.get("LD_LIBRARY_PATH", "")]),
        },
        wheel / "caches",
    )


def free_port() -> int:
    """A port nothing listens on now (for tests, benchmarks and the demo)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def find_installation(run_dir: Path) -> TritonInstallation:
    return container_installation() or pytriton_installation(run_dir)


@dataclass(frozen=True)
class ServerSettings:
    model_repository: Path  # with model control off, Triton serves every model in it
    models: tuple[str, ...]
    run_dir: Path
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    host: str = "127.0.0.1"  # the address all three endpoints bind to
    environment: dict[str, str] = field(default_factory=dict)  # e.g. NVEMBED_* overrides for the model
    log_verbose: int = 0
    # Off: Triton refuses every repository load/unload request, so no client can unload a model or
    # load one whose uploaded model.py would run on the server. Benchmarks that reconfigure a model
    # turn it on, on loopback only; the launcher never does.
    allow_model_control: bool = False
    # Triton's response cache, for benchmarks (bench_plumbing.py --response-cache): its key is the
    # model and its inputs only, not request parameters, so the shipped models do not enable it.
    response_cache_bytes: int = 0
    # Triton's own per-request timestamps (its trace API, level TIMESTAMPS, every request), written
    # to this file and its numbered siblings, for benchmarks (bench_latency.py): off when None.
    trace_file: Path | None = None
    trace_count: int = 0  # with trace_file: trace only the first this many requests; 0: all
    # The stubs' shared-memory regions are named with this prefix (leftovers.py), so a crashed
    # run's regions can be found and removed; empty: the Python backend's default name.
    shm_prefix: str = ""
    # Set: the model requires it on inference (in its environment, never on a command line), and
    # Triton forwards the header that carries it.
    inference_key: str = ""
    inherited_fds: tuple[int, ...] = ()  # descriptors tritonserver keeps open (the run record's lock)

    @property
    def local_host(self) -> str:
        """Where this machine reaches the server: loopback when it listens on every interface."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    @property
    def grpc_url(self) -> str:
        return f"{self.local_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.local_host}:{self.metrics_port}/metrics"


def own_group_dying_with_parent() -> None:
    """Runs in the child: its own process group (so the server and its stubs can be ended together),
    and SIGTERM if the launching process dies (Linux)."""
    os.setpgrp()
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass(frozen=True)
class Stub:
    """One Python-backend stub process: one model instance."""

    pid: int
    instance: str  # e.g. "nv-embed-v2_0_3"
    shm_region: str  # its shared-memory region, a file under /dev/shm

    def cpu_s(self) -> float:
        """CPU seconds the process has used so far (all its threads); 0 once it is gone."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _children(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return children


def stubs_of(pid: int) -> list[Stub]:
    """The live stubs of tritonserver `pid` (a dead one, until reaped, has no command line).
    A stub's command line: stub model.py shm-region shm-size shm-growth parent-pid backend-dir
    ipc-size instance-name kind."""
    stubs = []
    for child in _children(pid):
        try:
            args = Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
        except OSError:
            continue
        if args and args[0].endswith("triton_python_backend_stub") and len(args) >= 10:
            stubs.append(Stub(child, args[8], args[2]))
    return stubs


def log_tail(path: Path, lines: int = 60) -> str:
    """The log's last lines, after the lines saying why a model failed to load (which the
    unloading of many instances can push far from the end)."""
    if not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace").splitlines()
    failures = [line for line in text if "failed to load '" in line and line.startswith("E")]
    return "\n".join([*failures, *text[-lines:]])


def wait_until_ready(
    grpc_url: str,
    models: tuple[str, ...],
    process: subprocess.Popen,
    log_path: Path,
    timeout_s: float = 300.0,
    abort: threading.Event | None = None,
) -> None:
    """Until the server at `grpc_url` (run by `process`: tritonserver, or a launcher of it) says
    every model is ready, or `abort` is set. If the process exits or time runs out: ServerError
    with the log's tail."""
    import tritonclient.grpc as grpcclient

    deadline = time.monotonic() + timeout_s
    with grpcclient.InferenceServerClient(grpc_url) as client:
        while time.monotonic() < deadline and not (abort and abort.is_set()):
            if process.poll() is not None:
                program = Path(str(process.args[0])).name
                raise ServerError(f"{program} exited with code {process.returncode}\n{log_tail(log_path)}")
            try:
                if client.is_server_ready() and all(client.is_model_ready(m) for m in models):
                    return
            except Exception:  # not listening yet
                pass
            time.sleep(0.5)
    if abort and abort.is_set():
        return
    raise ServerError(f"the server at {grpc_url} was not ready after {timeout_s:.0f} s\n{log_tail(log_path)}")


def interrupt(process: subprocess.Popen, grace_s: float, kill: Callable[[], None] | None = None) -> int | None:
    """SIGINT (a drain, for tritonserver and serve.sh alike), then `kill` (default SIGKILL) if it
    has not exited after grace_s. Returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            (kill or process.kill)()
            process.wait()
    return process.returncode


class TritonServer:
    """A tritonserver child process. Use as a context manager, or start()/wait_ready()/stop()."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.log_path = settings.run_dir / "tritonserver.log"
        self._process: subprocess.Popen | None = None

    def command(self, installation: TritonInstallation) -> list[str]:
        s = self.settings
        return [
            str(installation.binary),
            f"--model-repository={s.model_repository}",
            f"--backend-directory={installation.backend_directory}",
            *(
                ["--model-control-mode=explicit", *[f"--load-model={name}" for name in s.models]]
                if s.allow_model_control
                else ["--model-control-mode=none"]
            ),
            f"--grpc-address={s.host}",
            f"--grpc-port={s.grpc_port}",
            f"--http-address={s.host}",
            f"--http-port={s.http_port}",
            f"--metrics-address={s.host}",
            f"--metrics-port={s.metrics_port}",
            f"--log-verbose={s.log_verbose}",
            *self.cache_arguments(installation),
            *self.trace_arguments(),
            *([f"--backend-config=python,shm-region-prefix-name={s.shm_prefix}"] if s.shm_prefix else []),
            *shm_arguments(),
            *self.restriction_arguments(),
            "--exit-on-error=true",
        ]

    def restriction_arguments(self) -> list[str]:
        closed = f"{','.join(RESTRICTED_APIS)}:{CLOSED_HEADER}={secrets.token_hex(16)}\n"
        forwarded = (f"--grpc-header-forward-pattern={FORWARDED_HEADERS}", f"--http-header-forward-pattern={FORWARDED_HEADERS}")
        return [f"--grpc-restricted-protocol={closed}", f"--http-restricted-api={closed}",
                *(forwarded if self.settings.inference_key else ())]  # fmt: skip

    def cache_arguments(self, installation: TritonInstallation) -> list[str]:
        if not self.settings.response_cache_bytes:
            return []
        where = [f"--cache-directory={installation.cache_directory}"] if installation.cache_directory else []
        return [f"--cache-config=local,size={self.settings.response_cache_bytes}", *where]

    def trace_arguments(self) -> list[str]:
        if self.settings.trace_file is None:
            return []
        settings = (f"triton,file={self.settings.trace_file}", "triton,log-frequency=1", "level=TIMESTAMPS", "rate=1",
                    *([f"count={self.settings.trace_count}"] if self.settings.trace_count else []))  # fmt: skip
        return [argument for setting in settings for argument in ("--trace-config", setting)]

    def start(self) -> TritonServer:
        self.settings.run_dir.mkdir(parents=True, exist_ok=True)
        installation = find_installation(self.settings.run_dir)
        environment = {**os.environ, **installation.environment, **self.settings.environment}
        if self.settings.inference_key:  # for the model: in its environment, which only its user can read
            environment[BY_KEY["inference_key"].variable] = self.settings.inference_key
        with open(self.log_path, "ab") as log:  # a restart keeps the log of what went wrong
            self._process = subprocess.Popen(
                self.command(installation), stdout=log, stderr=subprocess.STDOUT, env=environment,
                preexec_fn=own_group_dying_with_parent if sys.platform == "linux" else None,
                pass_fds=self.settings.inherited_fds,
            )  # fmt: skip
        return self

    def wait_ready(self, timeout_s: float = 300.0, abort: threading.Event | None = None) -> None:
        """Until every model answers ready (or `abort` is set); a server that exits or times out
        raises with its log."""
        wait_until_ready(self.settings.grpc_url, self.settings.models, self._process, self.log_path, timeout_s, abort)

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def stubs(self) -> list[Stub]:
        return stubs_of(self._process.pid) if self.is_running() else []

    def expected_stubs(self) -> int:
        """How many stub processes the served models' configs ask for: one per instance (per GPU
        listed for a KIND_GPU group). A dead stub is missed by no snapshot taken too late."""
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2

        total = 0
        for model in self.settings.models:
            text = (self.settings.model_repository / model / "config.pbtxt").read_text()
            config = text_format.Parse(text, model_config_pb2.ModelConfig())
            total += sum(max(group.count, 1) * max(len(group.gpus), 1) for group in config.instance_group) or 1
        return total

    def is_live(self, timeout_s: float) -> bool:
        """Whether tritonserver answers gRPC's liveness call within timeout_s."""
        import tritonclient.grpc as grpcclient

        with grpcclient.InferenceServerClient(self.settings.grpc_url) as client:
            return client.is_server_live(client_timeout=timeout_s)

    def kill(self) -> None:
        """Ends tritonserver and its stubs at once and removes their shared-memory regions. Only
        for a server with nothing in flight (drained) or a broken one: Triton 2.51 unloads
        Python-backend instances one after another, ~1.2 s each (a minute for 48 instances)."""
        if self._process is None:
            return
        regions = [stub.shm_region for stub in self.stubs()]
        try:
            os.killpg(self._process.pid, signal.SIGKILL)  # the server and every stub
        except ProcessLookupError:
            pass
        self._process.wait()
        self._remove_regions(regions)

    def stop(self, grace_s: float = 75.0) -> int | None:
        """SIGINT lets Triton unload models cleanly (the 48 front instances take ~1 min on 2 cores);
        a kill follows after the grace period. Triton gives up unloading after its own exit timeout
        (30 s) and exits, leaving the regions of the stubs it had not unloaded: they are removed here."""
        if self._process is None:
            return None
        regions = [stub.shm_region for stub in self.stubs()]
        code = interrupt(self._process, grace_s, self.kill)
        self._remove_regions(regions)
        return code

    def _remove_regions(self, regions: list[str]) -> None:
        for region in regions:  # what Triton would have unlinked on a clean unload
            Path("/dev/shm", region).unlink(missing_ok=True)
        if self.settings.shm_prefix:  # also the regions of stubs that had died before
            remove_regions(self.settings.shm_prefix)

    def wait(self) -> int:
        return self._process.wait()

    def log_tail(self, lines: int = 60) -> str:
        return log_tail(self.log_path, lines)

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
