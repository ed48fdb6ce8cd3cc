"""The laptop demo (./demo.sh): serve the small bundled all-MiniLM-L6-v2 through the same Triton
stack on the CPU, run the user's three tests (test/test-nv-embed-v2.py) against it, stop the
server. A development tool of the checkout, not part of the installed package."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nvembed_triton.serve import DEMO_MODEL, OpenAIServer, parser, plan, server_settings
from nvembed_triton.server import ServerError, TritonServer, free_port

TEST_SCRIPT = Path(__file__).resolve().parents[1] / "test" / "test-nv-embed-v2.py"


def main() -> int:
    plan_ = plan(parser().parse_args(["--demo"]))
    with tempfile.TemporaryDirectory(prefix="nvembed-demo-") as run_dir:
        server = TritonServer(server_settings(plan_, Path(run_dir)))
        print(f"demo: starting tritonserver with {DEMO_MODEL} ({plan_.model_dir}) on the CPU...", flush=True)
        try:
            with server:
                url = server.settings.grpc_url
                print(f"demo: ready on {url}; running {TEST_SCRIPT.name} --model {DEMO_MODEL}", flush=True)
                code = subprocess.call([sys.executable, str(TEST_SCRIPT), "--url", url, "--model", DEMO_MODEL], env=os.environ)
                show_openai_api(server.settings)
                return code
        except ServerError as error:
            print(f"demo: {error}", file=sys.stderr)
            return 1


def show_openai_api(settings) -> None:
    """The same model through the OpenAI-compatible API: how to call it, and one call."""
    import json
    import urllib.request

    port = free_port()
    http_api = OpenAIServer(settings, DEMO_MODEL, port)
    try:
        body = json.dumps({"model": DEMO_MODEL, "input": ["hello from the OpenAI API"]})
        print(f"""
demo: the OpenAI-compatible API (serve.sh --openai-port {port}):
  curl http://127.0.0.1:{port}/v1/embeddings -H 'Content-Type: application/json' -d '{body}'
  OpenAI(base_url="http://127.0.0.1:{port}/v1", api_key="unused").embeddings.create(model="{DEMO_MODEL}", input=[...])""")
        for _ in range(50):  # the API starts in the background
            try:
                url = f"http://127.0.0.1:{port}/v1/embeddings"
                request = urllib.request.Request(url, body.encode(), {"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=30) as response:
                    answer = json.loads(response.read())
                break
            except OSError:
                time.sleep(0.2)
        else:
            raise SystemExit("demo: the OpenAI API did not answer")
        vector = answer["data"][0]["embedding"]
        print(f"demo: it answered a {len(vector)}-dimensional embedding, usage {answer['usage']}", flush=True)
    finally:
        http_api.stop()


if __name__ == "__main__":
    sys.exit(main())
