"""The laptop demo: serve the small bundled all-MiniLM-L6-v2 through the same Triton stack on the
CPU, run the user's three tests (test/test-nv-embed-v2.py) against it, stop the server."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .serve import DEMO_MODEL, parser, plan, server_settings
from .server import ServerError, TritonServer

TEST_SCRIPT = Path(__file__).resolve().parents[2] / "test" / "test-nv-embed-v2.py"


def main() -> int:
    plan_ = plan(parser().parse_args(["--demo"]))
    with tempfile.TemporaryDirectory(prefix="nvembed-demo-") as run_dir:
        server = TritonServer(server_settings(plan_, Path(run_dir)))
        print(f"demo: starting tritonserver with {DEMO_MODEL} ({plan_.model_dir}) on the CPU...", flush=True)
        try:
            with server:
                url = server.settings.grpc_url
                print(f"demo: ready on {url}; running {TEST_SCRIPT.name} --model {DEMO_MODEL}", flush=True)
                return subprocess.call([sys.executable, str(TEST_SCRIPT), "--url", url, "--model", DEMO_MODEL], env=os.environ)
        except ServerError as error:
            print(f"demo: {error}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
