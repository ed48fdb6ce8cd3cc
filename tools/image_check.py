"""The container image, built and run: the repository's Dockerfile, unchanged, on a local stand-in
for NVIDIA's Triton image, with podman (no Docker daemon, no NGC registry here). CI runs it after
the test suite; from the repository root, as root (podman runs rootful here):

    .venv/bin/python tools/image_check.py

1. A Debian base (debootstrap, once; podman keeps it) and the stand-in on it
   (tools/image/triton-stand-in.Containerfile: Python 3.11 and nvidia-pytriton's tritonserver 2.51
   where the NGC image keeps its own). Layers are cached: a warm run takes minutes.
2. The Dockerfile built with --build-arg BASE_IMAGE=<the stand-in>, pip reaching the package
   registry through this machine's pip configuration, mounted read-only into the build.
3. The image run as it ships (uid 1000) on a read-only root filesystem, a tiny random NV-Embed-v2
   checkpoint mounted read-only, ports published, NVEMBED_DEVICE=cpu (no GPU here); its size
   printed. Checked through the published ports: the seed's gRPC calls (query, documents) against
   the same checkpoint computed in this process, the OpenAI API with the openai SDK,
   /v2/health/ready, the image's own HEALTHCHECK, the uid, and that a stop drains: requests in
   flight complete and the container exits 0 within its grace period.
Not covered: the NGC image's Triton 2.52, Python 3.12 and CUDA (the stand-in has none of them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from nvembed_triton.launcher.server import free_port  # noqa: E402
from nvembed_triton.protocol.contract import DOCUMENTS_INPUT, EMBEDDINGS_OUTPUT, PUBLIC_MODEL, QUERY_INPUT  # noqa: E402

DEBIAN_BASE = "localhost/nvembed-debian-base"
STAND_IN = "localhost/nvembed-triton-stand-in"
IMAGE = "localhost/nvembed-triton:check"
CONTAINER = "nvembed-triton-check"
DEBIAN_PACKAGES = "python3,python3-pip,python3-venv,libpython3.11,ca-certificates,curl,libjemalloc2"
# runc: crun fails on these machines (cgroups in hybrid mode); the default rlimits cannot be set.
PODMAN_FLAGS = ["--runtime", "runc"]
LIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768"]
# Headroom over podman's default of 2,048 tasks, past which the server hangs while starting
# (docs/deployment.md, "Threads").
PIDS_LIMIT = ["--pids-limit", "8192"]
# This machine's pip configuration (indexes, local wheels, CA bundle), for pip inside the builds.
PIP_MOUNTS = ["/etc/pip.conf", "/etc/xdg/pip", "/opt/wheels", "/opt/pypi", "/opt/pypi-more", "/etc/ssl/certs/ca-certificates.crt"]
STOP_GRACE_S = 40  # as deploy/kubernetes' terminationGracePeriodSeconds
READY_TIMEOUT_S = 300


def log(message: str) -> None:
    print(f"image_check: {message}", flush=True)


def podman(*args: str, check: bool = True, capture: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], check=check, text=True, capture_output=capture)


def ensure_podman() -> None:
    if shutil.which("podman"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        sys.exit("image_check: podman is not installed (apt-get install podman buildah runc debootstrap, as root)")
    log("installing podman, runc and debootstrap")
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "podman", "buildah", "runc", "debootstrap",
         "uidmap", "slirp4netns", "fuse-overlayfs"],
        check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )  # fmt: skip


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses, for debootstrap."""
    for source in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*.sources")]:
        if not source.is_file():
            continue
        for line in source.read_text().splitlines():
            words = line.split()
            if words[:1] == ["URIs:"] and "debian-security" not in words[1] or words[:1] == ["deb"] and "debian" in line:
                return words[1] if words[0] == "URIs:" else next(w for w in words if w.startswith("http"))
    return "http://deb.debian.org/debian"


def ensure_debian_base() -> None:
    if podman("image", "exists", DEBIAN_BASE, check=False).returncode == 0:
        return
    log(f"making {DEBIAN_BASE} with debootstrap (once)")
    with tempfile.TemporaryDirectory() as scratch:
        rootfs = Path(scratch) / "rootfs"
        subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={DEBIAN_PACKAGES}", "bookworm", str(rootfs), debian_mirror()],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["podman", "import", "-", DEBIAN_BASE], stdin=tar.stdout, check=True, stdout=subprocess.DEVNULL)
        tar.wait()


def build(containerfile: Path, tag: str, build_args: dict[str, str], docker_format: bool) -> None:
    mounts = [arg for path in PIP_MOUNTS if Path(path).exists() for arg in ("-v", f"{path}:{path}:ro")]
    started = time.monotonic()
    podman(
        "build", *PODMAN_FLAGS, *LIMITS, *mounts, *("--format", "docker") * docker_format,
        *[arg for key, value in build_args.items() for arg in ("--build-arg", f"{key}={value}")],
        "-f", str(containerfile), "-t", tag, str(ROOT),
    )  # fmt: skip
    log(f"built {tag} in {time.monotonic() - started:.0f} s")


def wait_ready(http_port: int) -> float:
    started = time.monotonic()
    while time.monotonic() - started < READY_TIMEOUT_S:
        state = podman("inspect", CONTAINER, "--format", "{{.State.Running}}", capture=True, check=False).stdout.strip()
        if state != "true":
            raise SystemExit(f"image_check: the container stopped while starting:\n{container_logs()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"image_check: not ready after {READY_TIMEOUT_S} s:\n{container_logs()}")


def container_logs() -> str:
    return podman("logs", "--tail", "60", CONTAINER, capture=True, check=False).stdout


def check_grpc(grpc_port: int, checkpoint: Path) -> None:
    """The seed's calls, compared with the same checkpoint computed here."""
    import tritonclient.grpc as grpcclient

    from nvembed_triton.engine.encoders import load_encoder
    from nvembed_triton.protocol.contract import RETRIEVAL_TASK, nvembed_query_instruction
    from nvembed_triton.protocol.options import TextOptions
    from nvembed_triton.settings import EncoderSettings

    query, documents = "how is bread made?", ["Flour, water, salt and yeast.", "Ovens bake the dough."]
    with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
        query_input = grpcclient.InferInput(QUERY_INPUT, [1], "BYTES")
        query_input.set_data_from_numpy(np.array([query], dtype=object))
        served_query = client.infer(PUBLIC_MODEL, [query_input]).as_numpy(EMBEDDINGS_OUTPUT).reshape(-1)
        documents_input = grpcclient.InferInput(DOCUMENTS_INPUT, [1, len(documents)], "BYTES")
        documents_input.set_data_from_numpy(np.array([documents], dtype=object))
        served_documents = client.infer(PUBLIC_MODEL, [documents_input]).as_numpy(EMBEDDINGS_OUTPUT).reshape(len(documents), -1)
    encoder = load_encoder(EncoderSettings.from_parameters({"model_dir": str(checkpoint), "device": "cpu"}))
    local_query = encoder.encode([query], [TextOptions(nvembed_query_instruction(RETRIEVAL_TASK))]).embeddings[0]
    local_documents = encoder.encode(documents, TextOptions.each(2)).embeddings
    assert float(served_query @ local_query) > 0.99999, "query vector differs from the in-process one"
    assert np.all(np.sum(served_documents * local_documents, axis=1) > 0.99999), "document vectors differ"
    log("gRPC query and documents: equal to the in-process vectors")


def check_openai(openai_port: int) -> None:
    from openai import OpenAI

    deadline = time.monotonic() + 60  # the OpenAI API is its own process, up a little after Triton
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{openai_port}/v1/models", timeout=2):
                break
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"image_check: the OpenAI API did not answer:\n{container_logs()}") from None
            time.sleep(0.5)
    client = OpenAI(base_url=f"http://127.0.0.1:{openai_port}/v1", api_key="unused")
    response = client.embeddings.create(model=PUBLIC_MODEL, input=["a passage", "another"])
    vectors = np.array([item.embedding for item in response.data])
    assert vectors.shape[0] == 2 and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    log(f"OpenAI API: {vectors.shape[0]} vectors of {vectors.shape[1]}, {response.usage.total_tokens} tokens")


def check_user_and_healthcheck() -> None:
    uid = podman("exec", CONTAINER, "id", "-u", capture=True).stdout.strip()
    assert uid == "1000", f"the container runs as uid {uid}, not 1000"
    health = podman("healthcheck", "run", CONTAINER, check=False, capture=True)
    assert health.returncode == 0, f"the image's HEALTHCHECK failed: {health.stdout}{health.stderr}"
    log("runs as uid 1000; the image's own HEALTHCHECK passes")


def check_drain(grpc_port: int) -> None:
    """Requests in flight when the stop comes are answered; the container exits 0 in time."""
    import tritonclient.grpc as grpcclient

    results: list[str] = []
    # ~100k tokens each: about a second apiece for the tiny network on a 2-core CPU, so none is
    # answered before the stop and all are well inside serve.sh's 25 s drain (4 x 400k tokens took
    # 22 s here and more than 25 s on CI's machine: the drain's limit, not the drain, ended them).
    texts = np.array([[" ".join(["dough"] * 100)] * 1024], dtype=object)

    def send() -> None:
        try:
            with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
                tensor = grpcclient.InferInput(DOCUMENTS_INPUT, list(texts.shape), "BYTES")
                tensor.set_data_from_numpy(texts)
                answer = client.infer(PUBLIC_MODEL, [tensor], client_timeout=STOP_GRACE_S)
                results.append("ok" if np.isfinite(answer.as_numpy(EMBEDDINGS_OUTPUT)).all() else "not finite")
        except Exception as error:  # noqa: BLE001 - reported by the assert below
            # InferenceServerException's repr is empty: its str carries the gRPC status and message.
            results.append(f"{type(error).__name__} after {time.monotonic() - sent:.1f} s: {error}")

    senders = [threading.Thread(target=send) for _ in range(4)]
    sent = time.monotonic()
    for sender in senders:
        sender.start()
    time.sleep(0.5)  # the requests are in the server before the stop
    answered_before_stop = len(results)
    started = time.monotonic()
    podman("stop", "--time", str(STOP_GRACE_S), CONTAINER, capture=True)
    stopped_s = time.monotonic() - started
    for sender in senders:
        sender.join(STOP_GRACE_S)
    code = podman("inspect", CONTAINER, "--format", "{{.State.ExitCode}}", capture=True).stdout.strip()
    assert answered_before_stop == 0, "the requests were answered before the stop: make them larger"
    assert results == ["ok"] * len(senders), f"requests in flight at the stop: {results}\n{container_logs()}"
    assert code == "0" and stopped_s < STOP_GRACE_S, f"exit code {code} after {stopped_s:.1f} s:\n{container_logs()}"
    log(f"stop drained {len(senders)} requests in flight and exited 0 in {stopped_s:.1f} s")


def main() -> int:
    started = time.monotonic()
    ensure_podman()
    ensure_debian_base()
    build(ROOT / "tools/image/triton-stand-in.Containerfile", STAND_IN, {"DEBIAN_BASE": DEBIAN_BASE}, docker_format=False)
    build(ROOT / "Dockerfile", IMAGE, {"BASE_IMAGE": STAND_IN}, docker_format=True)  # docker format keeps HEALTHCHECK
    sizes = {tag: int(podman("image", "inspect", "--format", "{{.Size}}", tag, capture=True).stdout) for tag in (STAND_IN, IMAGE)}
    log(f"image {sizes[IMAGE] / 1e9:.2f} GB, of which the stand-in base {sizes[STAND_IN] / 1e9:.2f} GB")
    podman("rm", "--force", CONTAINER, capture=True, check=False)
    with tempfile.TemporaryDirectory() as scratch:
        from nvembed_triton.testing.tiny_checkpoint import write_tiny_checkpoint

        checkpoint = write_tiny_checkpoint(Path(scratch) / "NV-Embed-v2")
        os.chmod(scratch, 0o755)  # readable by the container's uid 1000
        ports = {"http": free_port(), "grpc": free_port(), "openai": free_port()}
        podman(
            # --read-only: a read-only root filesystem, as deploy/kubernetes runs it (podman mounts
            # tmpfs on /tmp, /run and /var/tmp, as the manifests' emptyDirs do).
            "run", *PODMAN_FLAGS, *LIMITS, *PIDS_LIMIT, "--detach", "--read-only", "--name", CONTAINER, "--shm-size=1g",
            "-p", f"127.0.0.1:{ports['http']}:8000", "-p", f"127.0.0.1:{ports['grpc']}:8001",
            "-p", f"127.0.0.1:{ports['openai']}:8080", "-v", f"{checkpoint}:/models/NV-Embed-v2:ro",
            "-e", "NVEMBED_DEVICE=cpu", IMAGE, capture=True,
        )  # fmt: skip
        try:
            log(f"ready in {wait_ready(ports['http']):.0f} s")
            check_grpc(ports["grpc"], checkpoint)
            check_openai(ports["openai"])
            check_user_and_healthcheck()
            check_drain(ports["grpc"])
        finally:
            podman("rm", "--force", CONTAINER, capture=True, check=False)
    log(f"passed in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
