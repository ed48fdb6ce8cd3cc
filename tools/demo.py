"""The laptop demo (./demo.sh): serve the small bundled all-MiniLM-L6-v2 through the same Triton
stack on the CPU, run the user's three tests (test/test-nv-embed-v2.py) against it, call the
OpenAI-compatible API once, stop the server, and say how to serve it yourself. A development tool
of the checkout, not part of the installed package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from nvembed_triton.launcher.serve import DEMO_MODEL, OpenAIServer, check_ports_free, parser, plan, server_settings
from nvembed_triton.launcher.server import ServerError, ServerSettings, TritonServer, free_port
from nvembed_triton.settings import BY_KEY

TEST_SCRIPT = Path(__file__).resolve().parents[1] / "test" / "test-nv-embed-v2.py"
README_SECTION = 'README.md, "From the demo to your own server"'
OPENAI_PORT = 8080  # what the closing message suggests, as the README does


def main(argv: list[str]) -> int:
    try:
        return demo(argv)
    except KeyboardInterrupt:  # the server, if one started, was stopped on the way out
        print("\ndemo: interrupted; nothing is left running", file=sys.stderr)
        return 130


def demo(argv: list[str]) -> int:
    """serve.sh's port flags (--grpc-port, --http-port, --metrics-port) and variables apply."""
    plan_ = plan(parser().parse_args(["--demo", *argv]))
    with tempfile.TemporaryDirectory(prefix="nvembed-demo-") as run_dir:
        server = TritonServer(server_settings(plan_, Path(run_dir)))
        try:
            check_ports_free(server.settings)  # in 0.1 s, not after loading the model
            print(f"demo: starting tritonserver with {DEMO_MODEL} ({plan_.model_dir}) on the CPU...", flush=True)
            with server:
                url = server.settings.grpc_url
                print(f"demo: ready on {url}; running {TEST_SCRIPT.name} --model {DEMO_MODEL}", flush=True)
                code = subprocess.call([sys.executable, str(TEST_SCRIPT), "--url", url, "--model", DEMO_MODEL], env=os.environ)
                call_openai_api(server.settings)
                print("demo: stopping the server", flush=True)
        except ServerError as error:
            print(f"demo: {error}", file=sys.stderr)
            return 1
    print(closing_message(server.settings), flush=True)
    return code


def call_openai_api(settings: ServerSettings) -> None:
    """The same model through the OpenAI-compatible API (on a free port, for the demo only): one call."""
    port = free_port()
    http_api = OpenAIServer(settings, DEMO_MODEL, port)
    try:
        body = json.dumps({"model": DEMO_MODEL, "input": ["hello from the OpenAI API"]}).encode()
        for _ in range(50):  # the API starts in the background
            try:
                url = f"http://127.0.0.1:{port}/v1/embeddings"
                request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=30) as response:
                    answer = json.loads(response.read())
                break
            except OSError:
                time.sleep(0.2)
        else:
            raise SystemExit("demo: the OpenAI API did not answer")
        vector = answer["data"][0]["embedding"]
        print(f"\ndemo: the OpenAI-compatible API (POST /v1/embeddings) answered a {len(vector)}-dimensional "
              f"embedding, usage {answer['usage']}", flush=True)  # fmt: skip
    finally:
        http_api.stop()


def closing_message(settings: ServerSettings) -> str:
    """How to go on: the demo's server has stopped, so these are commands to serve it yourself.
    They use the ports the demo used (serve.sh reads the same TRITON_* variables)."""
    url = "" if settings.grpc_port == int(BY_KEY["grpc_port"].default) else f" --url localhost:{settings.grpc_port}"
    body = json.dumps({"model": DEMO_MODEL, "input": ["what is flour?"]})
    return f"""
demo: done; the demo's server has stopped. To serve {DEMO_MODEL} yourself (Ctrl-C stops it):
  ./serve.sh --demo --openai-port {OPENAI_PORT}
and, in another terminal, call it:
  .venv/bin/python test/test-nv-embed-v2.py --model {DEMO_MODEL}{url}
  curl http://localhost:{OPENAI_PORT}/v1/embeddings -H 'Content-Type: application/json' -d '{body}'
The Python client, LangChain, the OpenAI SDK, and the tiny NV-Embed-v2 checkpoint: {README_SECTION}."""


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
