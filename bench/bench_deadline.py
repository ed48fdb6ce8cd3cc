"""Does Triton 2.51 end a request at its own timeout once a model has taken it? The public model
polls for its client's timeout while it waits on the encoder; a BLS request carrying the timeout
(pb_utils.InferenceRequest(timeout=...)) would make that polling unneeded if Triton honoured it.
The encoder's execute() takes every request at once (lanes.py), so a forwarded request's timeout
could only be honoured while the encoder computes. This sends one long request (64 documents of
~240 tokens, seconds on a CPU) to serve.sh --demo:
  - to the encoder directly, with no timeout and with a 100 ms timeout (Triton's own handling of a
    request timeout, the same for a client's request and a BLS one);
  - to the public model with a 100 ms timeout (its polling).

    .venv/bin/python bench/bench_deadline.py [--timeout-ms 100] [--json PATH]

Measured once with the public model patched to forward its timeout on the BLS request and wait
without polling: the same seconds as no timeout (bench/RESULTS.md, "A request's timeout").
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from bench_server import request_inputs
from shared import write_json

from nvembed_triton.protocol.contract import DOCUMENTS_INPUT, TEXT_INPUT, encoder_model_name
from nvembed_triton.serving.serve import parser, plan, server_settings
from nvembed_triton.serving.server import TritonServer, free_port

WORDS = "the quick brown fox jumps over a lazy dog while markets follow supply and demand".split()


def timed_call(client, model: str, inputs, timeout_us: int | None) -> dict:
    started = time.perf_counter()
    try:
        client.infer(model, inputs, timeout=timeout_us)
        outcome = "answered"
    except Exception as error:  # the outcome is the measurement
        outcome = f"error: {str(error)[:160]}"
    return {"model": model, "timeout_ms": timeout_us and timeout_us / 1000, "ms": (time.perf_counter() - started) * 1e3,
            "outcome": outcome}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timeout-ms", type=float, default=100.0)
    p.add_argument("--json", default="bench/results/deadline.json")
    args = p.parse_args()
    rng = random.Random(0)
    documents = [" ".join(rng.choice(WORDS) for _ in range(240)) for _ in range(64)]
    plan_ = plan(parser().parse_args(["--demo"]))
    environ = {**os.environ, "TRITON_HOST": "127.0.0.1"}
    environ.update({name: str(free_port()) for name in ("TRITON_GRPC_PORT", "TRITON_HTTP_PORT", "TRITON_METRICS_PORT")})
    timeout_us = int(args.timeout_ms * 1000)
    encoder = encoder_model_name(plan_.name)
    direct = [np.array([[d.encode() for d in documents]], dtype=object)]
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="bench-deadline-"))
    with TritonServer(server_settings(plan_, scratch, environ)) as server:
        with grpcclient.InferenceServerClient(server.settings.grpc_url) as client:
            text = grpcclient.InferInput(TEXT_INPUT, list(direct[0].shape), "BYTES")
            text.set_data_from_numpy(direct[0])
            timed_call(client, encoder, [text], None)  # warm-up
            for model, inputs, timeout in (
                (encoder, [text], None),
                (encoder, [text], timeout_us),
                (plan_.name, request_inputs(DOCUMENTS_INPUT, documents), timeout_us),
            ):
                rows.append(timed_call(client, model, inputs, timeout))
                print(f"{model:28s} timeout {rows[-1]['timeout_ms']} ms -> {rows[-1]['ms']:.0f} ms, {rows[-1]['outcome']}")
        server.kill()
    shutil.rmtree(scratch, ignore_errors=True)
    write_json({"rows": rows, "documents": len(documents)}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
