"""One JSON line per forward pass, for benchmarks and diagnosis (setting pass_log): what a pass
held (rows, tokens, the tokens it computed with padding, its path: a CUDA graph's bucket, packed or
padded), its GPU time (CUDA events around the pass alone) and wall time, and what its lane held
(the requests it took, those still waiting). On a GPU this shows what limits single queries."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

from nvembed_triton.engine.text_encoder import PassRecord


class PassLog:
    def __init__(self, path: str):
        self._file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - open for the model's life
        self._lock = threading.Lock()

    def write(self, lane: str, requests: int, waiting: int, records: list[PassRecord]) -> None:
        now = time.time()
        lines = "".join(
            json.dumps({"time": now, "lane": lane, "requests": requests, "waiting": waiting, **dataclasses.asdict(record)}) + "\n"
            for record in records
        )
        with self._lock:
            self._file.write(lines)

    def close(self) -> None:
        self._file.close()
