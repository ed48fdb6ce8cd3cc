"""A newcomer's path, as a user walks it, with real processes: the README's "From the demo to your
own server" run command by command against servers started the way it says, the demo's closing
message, serve.sh's early failures (no GPU, busy ports), the user's test script run with a Python
outside the venv, a client pointed at nothing, and the Metrics section's series on a fresh server."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, SERVE_SH, free_port
from grpc_helpers import embed_documents, embed_query
from server_processes import scrape_metrics, wait_for_api

from nvembed_triton.launcher.serve import DEMO_MODEL
from nvembed_triton.launcher.server import interrupt, wait_until_ready
from nvembed_triton.protocol.contract import PUBLIC_MODEL

README = ROOT / "README.md"
SECTION = "From the demo to your own server"
# The addresses the README's commands use: serve.sh's defaults and the suggested OpenAI port.
README_PORTS = {"grpc": 8001, "http": 8000, "metrics": 8002, "openai": 8080}
TINY_DIR = "/tmp/tiny-nv-embed-v2"  # where the README writes the tiny checkpoint


# --- the README, read as a user reads it --------------------------------------------------------


def readme_section(title: str, page: Path = README) -> str:
    text = page.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"{page.name} has no section {title!r}"
    return match.group(1)


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


def shell_commands(text: str) -> list[str]:
    """Every command of the section's bash blocks, continuation lines joined."""
    commands = []
    for block in code_blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(re.sub(r"\s+", " ", line.strip()))
    return commands


@dataclass
class Server:
    """A server started from a README command, on free ports (the README's may be taken here)."""

    ports: dict[str, int]
    process: subprocess.Popen
    first_scrape: dict[tuple, float]  # /metrics as soon as the models were ready


def localize(text: str, ports: dict[str, int]) -> str:
    """The README's text with its default addresses pointed at a server's ports."""
    for kind, port in README_PORTS.items():
        text = text.replace(f"localhost:{port}", f"127.0.0.1:{ports[kind]}")
    return text


def start_readme_server(command: str, model: str, tmp: Path, env: dict[str, str] | None = None) -> Server:
    """The README's serve.sh command with its ports moved to free ones through the port flags."""
    ports = {kind: free_port() for kind in README_PORTS}
    argv = shlex.split(command.replace(f"--openai-port {README_PORTS['openai']}", f"--openai-port {ports['openai']}"))
    assert argv[0] == "./serve.sh", command
    argv[0] = str(SERVE_SH)
    argv += ["--grpc-port", str(ports["grpc"]), "--http-port", str(ports["http"]), "--metrics-port", str(ports["metrics"])]
    run_dir = tmp / "run"
    environment = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    with open(tmp / "serve.out", "wb") as console:
        process = subprocess.Popen([*argv, "--run-dir", str(run_dir)], cwd=ROOT, env=environment, stdout=console,
                                   stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_until_ready(f"127.0.0.1:{ports['grpc']}", (model,), process, run_dir / "tritonserver.log")
        first_scrape = scrape_metrics(ports["metrics"])
        wait_for_api(SimpleNamespace(openai_port=ports["openai"]))  # it starts once Triton is ready
    except BaseException:
        interrupt(process, grace_s=60)
        raise
    return Server(ports, process, first_scrape)


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory) -> Iterator[Server]:
    """`./serve.sh --demo --openai-port 8080` as the README writes it. Its health probe is slowed
    down so that the first scrape sees the series before any query at all (the probe is one)."""
    command = next(c for c in shell_commands(readme_section(SECTION)) if c.startswith("./serve.sh --demo"))
    tmp = tmp_path_factory.mktemp("readme-demo")
    server = start_readme_server(command, DEMO_MODEL, tmp, {"NVEMBED_HEALTH_INTERVAL_S": "600"})
    yield server
    interrupt(server.process, grace_s=60)


def run(argv: list[str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kwargs)


# --- 1. the README section, command by command ---------------------------------------------------


def test_the_section_comes_before_the_real_weights_and_says_what_it_runs():
    text = README.read_text(encoding="utf-8")
    assert text.index("## Two commands") < text.index(f"## {SECTION}") < text.index("## Serving NV-Embed-v2 on a GPU")
    commands = shell_commands(readme_section(SECTION))
    assert "./serve.sh --demo --openai-port 8080" in commands
    assert f".venv/bin/python -m nvembed_triton.testing.tiny_checkpoint {TINY_DIR}" in commands
    assert f"./serve.sh --model-dir {TINY_DIR} --device cpu --openai-port 8080" in commands
    # Every command in the section is one the tests below run; a new one needs its test.
    tested = ("./serve.sh ", ".venv/bin/python -m nvembed_triton.testing.tiny_checkpoint ",
              ".venv/bin/python test/test-nv-embed-v2.py ", "curl http://localhost:8080/v1/embeddings ",
              "curl -s localhost:8002/metrics ")  # fmt: skip
    assert [c for c in commands if not c.startswith(tested)] == []


def test_the_tiny_checkpoint_commands_make_a_servable_model(tmp_path):
    """The README's two tiny-checkpoint commands, its directory moved into tmp_path; the serve
    command with --check (the session's nvembed_server serves the same way)."""
    commands = [c.replace(TINY_DIR, str(tmp_path / "tiny")) for c in shell_commands(readme_section(SECTION)) if TINY_DIR in c]
    make, serve = commands
    made = run(shlex.split(make.replace(".venv/bin/python", sys.executable, 1)))
    assert made.returncode == 0, made.stderr
    checked = run([str(SERVE_SH), *shlex.split(serve)[1:], "--check"], env={**os.environ, "PYTHON": sys.executable})
    assert checked.returncode == 0, checked.stderr
    assert f"can be served as {PUBLIC_MODEL}" in checked.stdout


def python_blocks() -> dict[str, str]:
    """The section's Python blocks, by what they call."""
    blocks = code_blocks(readme_section(SECTION), "python")
    names = {"tritonclient": "import tritonclient", "client": "EmbeddingClient(", "openai": "from openai import",
             "langchain": "NVEmbedTritonEmbeddings("}  # fmt: skip
    found = {name: next(b for b in blocks if marker in b) for name, marker in names.items()}
    assert len(blocks) == len(found), "a Python block the tests do not run"
    return found


def run_python_block(ports: dict[str, int], name: str, model: str) -> str:
    code = localize(python_blocks()[name], ports).replace(f'"{DEMO_MODEL}"', f'"{model}"')
    result = run([sys.executable, "-c", code])
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def similarities(output: str) -> list[float]:
    return [float(value) for value in re.search(r"\[([^\]]*)\]", output).group(1).split()]


@pytest.mark.server
@pytest.mark.parametrize("name", ["tritonclient", "client"])
def test_grpc_snippets_rank_the_flour_passage_first(demo_server, name):
    """Real weights: the passage about flour is the closer one to the question about flour."""
    scores = similarities(run_python_block(demo_server.ports, name, DEMO_MODEL))
    assert len(scores) == 2 and -1 <= scores[1] < scores[0] <= 1


@pytest.mark.server
def test_openai_sdk_snippet(demo_server):
    output = run_python_block(demo_server.ports, "openai", DEMO_MODEL)
    assert output.startswith("2 384 ") and "prompt_tokens=" in output


@pytest.mark.server
def test_langchain_snippet_finds_the_flour_passage(demo_server):
    assert run_python_block(demo_server.ports, "langchain", DEMO_MODEL).strip() == "Flour is ground wheat."


@pytest.mark.server
def test_curl_commands(demo_server):
    commands = [c for c in shell_commands(readme_section(SECTION)) if c.startswith("curl")]
    embeddings, metrics = (localize(c, demo_server.ports) for c in commands)
    answer = json.loads(run(["bash", "-c", embeddings]).stdout)
    assert len(answer["data"]) == 1 and len(answer["data"][0]["embedding"]) == 384
    lines = run(["bash", "-c", metrics]).stdout.splitlines()
    assert lines and all(line.startswith("nvembed_") for line in lines)
    assert any(line.startswith(f'nvembed_texts_total{{model="{DEMO_MODEL}"') for line in lines)


def the_test_script_command(server: Server) -> list[str]:
    command = next(c for c in shell_commands(readme_section(SECTION)) if "test/test-nv-embed-v2.py" in c)
    return [*shlex.split(command), "--url", f"127.0.0.1:{server.ports['grpc']}"]


@pytest.mark.server
def test_the_test_script_as_written(demo_server):
    argv = the_test_script_command(demo_server)
    assert argv[0] == ".venv/bin/python"
    if not (ROOT / argv[0]).is_file():  # a checkout whose environment is elsewhere: this test's Python
        argv[0] = sys.executable
    result = run(argv)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed, 0 failed" in result.stdout


@pytest.mark.parametrize("name", ["tritonclient", "client", "openai", "langchain"])
def test_the_snippets_with_the_tiny_nv_embed_v2(nvembed_server, name):
    """As the README says for the tiny checkpoint: the same calls with the model nv-embed-v2."""
    ports = {"grpc": int(nvembed_server.url.rsplit(":", 1)[1]), "http": nvembed_server.http_port,
             "metrics": nvembed_server.metrics_port, "openai": nvembed_server.openai_port}  # fmt: skip
    wait_for_api(nvembed_server)
    output = run_python_block(ports, name, PUBLIC_MODEL)
    if name in ("tritonclient", "client"):
        assert len(similarities(output)) == 2
    elif name == "openai":
        assert output.startswith("2 64 ")
    else:  # random weights: the nearer passage is whichever the server's own vectors say
        passages = ["Flour is ground wheat.", "Markets follow supply and demand."]
        with nvembed_server.client() as client:
            query = embed_query(client, PUBLIC_MODEL, "what is flour made of?")[0]
            scores = embed_documents(client, PUBLIC_MODEL, passages) @ query
        assert output.strip() == passages[int(scores.argmax())]


# --- 7. every series the Metrics section lists, from the first scrape -------------------------------


def listed_series() -> set[tuple[str, tuple]]:
    """(metric, labels) from the Metrics section's table; a label's values are in parentheses where
    it first appears."""
    values: dict[str, list[str]] = {}
    series = set()
    table = readme_section("Metrics", ROOT / "docs" / "operations.md")
    for name, labels in re.findall(r"^\| `(nvembed_\w+)` \| \w+ \|([^|]*)\|", table, re.M):
        label = re.search(r"`(\w+)`(?: \(([^)]*)\))?", labels)
        if label and label.group(2):
            values[label.group(1)] = [v.strip() for v in label.group(2).split(",")]
        label_sets = [{label.group(1): v} for v in values[label.group(1)]] if label else [{}]
        series.update((name, tuple(sorted({"model": DEMO_MODEL, **labels}.items()))) for labels in label_sets)
    return series


@pytest.mark.server
def test_every_listed_series_is_there_at_zero_before_any_request(demo_server):
    from nvembed_triton.model.metrics import COUNTERS, series

    listed = listed_series()
    assert len(listed) == sum(len(series(name)) for name in COUNTERS) + 1  # and the executing gauge
    scraped = {key: value for key, value in demo_server.first_scrape.items() if key[0].startswith("nvembed_")}
    assert set(scraped) == listed  # every listed series, and none the README does not list
    assert all(value == 0 for value in scraped.values()), {key: v for key, v in scraped.items() if v}


# --- 2. the demo's closing message -----------------------------------------------------------------


@pytest.mark.server
def test_the_demo_ends_saying_how_to_serve_it_yourself(tmp_path):
    """tools/demo.py (what ./demo.sh runs after setup.sh) on free ports: its three tests pass, and
    its last words are commands for a server of your own (its own has stopped: nothing listens on
    its port afterwards) and the README section that goes on from there."""
    ports = {f"TRITON_{kind}_PORT": str(free_port()) for kind in ("GRPC", "HTTP", "METRICS")}
    result = run([sys.executable, "tools/demo.py"], timeout=480, env={**os.environ, **ports})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "3 passed, 0 failed" in result.stdout
    closing = result.stdout[result.stdout.index("demo: done") :]
    assert "the demo's server has stopped" in closing and f'"{SECTION}"' in closing
    serve = re.search(r"^  (\./serve\.sh .*)$", closing, re.M).group(1)
    assert serve in shell_commands(readme_section(SECTION))  # the command the README explains
    openai_port = re.search(r"--openai-port (\d+)", serve).group(1)
    assert re.findall(r"curl http://localhost:(\d+)/", closing) == [openai_port]  # the server that command starts
    assert f"test/test-nv-embed-v2.py --model {DEMO_MODEL} --url localhost:{ports['TRITON_GRPC_PORT']}" in closing
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", int(ports["TRITON_GRPC_PORT"])))


# --- 3. no GPU: a clear refusal within seconds -----------------------------------------------------


def serve_sh(*args: str, timeout: float = 60, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = run([str(SERVE_SH), *args], timeout=timeout, env={**os.environ, "PYTHON": sys.executable, **env})
    return result, time.monotonic() - started


def gpu_visible() -> bool:
    from nvembed_triton.launcher.serve import visible_gpus

    found = visible_gpus()
    return found is None or found[0] > 0


@pytest.mark.skipif(gpu_visible(), reason="a GPU is visible here")
def test_the_default_device_without_a_gpu_fails_in_seconds_naming_device_cpu(tiny_checkpoint):
    """Before: tritonserver started, the encoder failed to load after ~53 s, and serve.sh printed
    ~60 lines of its log."""
    ports = {f"TRITON_{kind}_PORT": str(free_port()) for kind in ("GRPC", "HTTP", "METRICS")}
    result, took_s = serve_sh("--model-dir", str(tiny_checkpoint), **ports)
    assert result.returncode == 1 and took_s < 15, (took_s, result.stderr)
    assert "the device is cuda:0" in result.stderr and "--device cpu" in result.stderr
    assert len(result.stderr.splitlines()) <= 4 and "starting tritonserver" not in result.stdout


@pytest.mark.skipif(gpu_visible(), reason="a GPU is visible here")
def test_gpus_asked_for_without_a_gpu_name_the_variable(tiny_checkpoint):
    result, took_s = serve_sh("--model-dir", str(tiny_checkpoint), "--device", "cpu", NVEMBED_GPUS="0,1")
    assert result.returncode == 1 and took_s < 15
    assert "NVEMBED_GPUS is 0,1" in result.stderr and "unset NVEMBED_GPUS and pass --device cpu" in result.stderr


def test_torch_is_asked_when_gpu_devices_exist():
    """Where /dev/nvidia* exists, torch decides: CUDA_VISIBLE_DEVICES="" hides every GPU from it."""
    from nvembed_triton.launcher.serve import torch_gpus

    count, how = torch_gpus({**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert count == 0 and how.startswith("torch sees 0 CUDA device(s) (torch ")


# --- 4. busy ports: all at once, with the flag and the variable ------------------------------------


def test_every_busy_port_is_named_at_once_with_its_flag_and_variable(tiny_checkpoint):
    with socket.socket() as grpc_taken, socket.socket() as http_taken:
        for taken in (grpc_taken, http_taken):
            taken.bind(("127.0.0.1", 0))
            taken.listen()
        grpc, http = str(grpc_taken.getsockname()[1]), str(http_taken.getsockname()[1])
        # metrics and the OpenAI API free; the OpenAI API given the gRPC port as well
        result, took_s = serve_sh("--model-dir", str(tiny_checkpoint), "--device", "cpu", "--grpc-port", grpc,
                                  "--metrics-port", str(free_port()), "--openai-port", grpc, TRITON_HTTP_PORT=http)  # fmt: skip
    assert result.returncode == 1 and took_s < 15 and "starting tritonserver" not in result.stdout
    named = [line for line in result.stderr.splitlines() if line.startswith("  port ")]
    assert named == [
        f"  port {grpc} (grpc_port): Address already in use; use another: --grpc-port PORT or TRITON_GRPC_PORT=PORT",
        f"  port {http} (http_port): Address already in use; use another: --http-port PORT or TRITON_HTTP_PORT=PORT",
        f"  port {grpc} (openai_port): also given to grpc_port; use another: --openai-port PORT or NVEMBED_OPENAI_PORT=PORT",
    ]


def test_the_demo_names_a_busy_port_before_loading_anything():
    """Before: with 8001 taken, ./demo.sh loaded the model and failed after 27 s inside 60 lines of
    Triton's log."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        started = time.monotonic()
        result = run([sys.executable, "tools/demo.py", "--http-port", str(free_port())], timeout=60,
                     env={**os.environ, "TRITON_GRPC_PORT": port, "TRITON_METRICS_PORT": str(free_port())})  # fmt: skip
        took_s = time.monotonic() - started
    assert result.returncode == 1 and took_s < 15 and "starting tritonserver" not in result.stdout, result.stderr
    assert f"port {port} (grpc_port): Address already in use; use another: --grpc-port PORT or TRITON_GRPC_PORT=PORT" in (
        result.stderr
    )
    assert len(result.stderr.splitlines()) <= 4


@pytest.mark.server
def test_ctrl_c_while_the_demo_loads_ends_it_without_a_traceback_or_a_server_left():
    ports = {f"TRITON_{kind}_PORT": str(free_port()) for kind in ("GRPC", "HTTP", "METRICS")}
    # As a terminal starts it: a runner in the background (CI's, nohup) passes SIGINT on ignored.
    demo = subprocess.Popen([sys.executable, "tools/demo.py"], cwd=ROOT, env={**os.environ, **ports},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    assert "starting tritonserver" in demo.stdout.readline()
    time.sleep(2)  # tritonserver is loading the model
    demo.send_signal(signal.SIGINT)
    stderr = demo.communicate(timeout=60)[1]
    assert demo.returncode == 130 and "Traceback" not in stderr, stderr
    assert "demo: interrupted; nothing is left running" in stderr
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", int(ports["TRITON_GRPC_PORT"])))


def test_every_port_has_a_flag():
    from nvembed_triton.settings import BY_KEY

    for key in ("grpc_port", "http_port", "metrics_port", "openai_port"):
        assert BY_KEY[key].flag == "--" + key.replace("_", "-")


# --- 5. the user's test script, run as the README says and with another Python ---------------------


def python_without_tritonclient() -> str | None:
    for candidate in ("/usr/bin/python3", shutil.which("python3")):
        if candidate and Path(candidate).is_file() and run([candidate, "-c", "import tritonclient"]).returncode != 0:
            return candidate
    return None


@pytest.mark.server
@pytest.mark.skipif(python_without_tritonclient() is None, reason="every Python here has tritonclient")
def test_the_test_script_runs_with_a_python_outside_the_venv(demo_server):
    """`python3 test/test-nv-embed-v2.py`, with a python3 that lacks tritonclient: it re-runs
    itself with the checkout's .venv (before: No module named 'tritonclient')."""
    if not (ROOT / ".venv" / "bin" / "python").is_file():
        pytest.skip("this checkout has no .venv")
    argv = the_test_script_command(demo_server)
    result = run([python_without_tritonclient(), *argv[1:]], env={k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed, 0 failed" in result.stdout


def test_the_test_script_fails_as_its_help_says():
    """Against nothing: each of the three checks fails, and the script exits 1, as --help says."""
    help_text = run([sys.executable, "test/test-nv-embed-v2.py", "--help"]).stdout
    assert "Runs all three, prints PASS or FAIL for each, and exits\nwith 1 if any failed." in help_text
    result = run([sys.executable, "test/test-nv-embed-v2.py", "--url", f"127.0.0.1:{free_port()}"], timeout=60)
    assert result.returncode == 1 and result.stdout.count("FAIL: ") == 3 and "0 passed, 3 failed" in result.stdout


# --- 6. a client pointed at nothing says so within seconds -----------------------------------------


def test_an_unreachable_server_is_reported_within_seconds_while_retrying():
    """The default retry budget (about 50 s) stays; a warning comes after about a second of failures
    (before: nothing for ~53 s, then the exception). The process has no logging set up: Python's
    last-resort handler prints the warning, as it would for a user's script."""
    port = free_port()
    code = f"from nvembed_triton.client import EmbeddingClient\nEmbeddingClient('localhost:{port}').encode(['x'])\n"
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "is unavailable" not in line and time.monotonic() - started < 10:
            line = process.stderr.readline()
        took_s = time.monotonic() - started
        assert process.poll() is None  # still retrying
    finally:
        process.kill()
        process.wait()
    assert took_s < 10, took_s
    assert f"at localhost:{port} is unavailable (UNAVAILABLE: " in line, line
    assert re.search(r"retrying reading the model config for up to about (\d+) s more \(max_retries 30\)", line), line
    assert int(re.search(r"about (\d+) s", line).group(1)) >= 45


# --- 8. --help names the program as it was run ------------------------------------------------------


def test_help_names_the_program_as_it_was_run():
    assert run([str(SERVE_SH), "--help"], env={**os.environ, "PYTHON": sys.executable}).stdout.startswith("usage: serve.sh ")
    console_script = Path(sys.executable).parent / "nvembed-triton-serve"
    assert run([str(console_script), "--help"]).stdout.startswith("usage: nvembed-triton-serve ")
