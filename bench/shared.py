"""What the benchmarks share: document lengths and result files. Standard library only."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path


def log_uniform_lengths(rng: random.Random, count: int, low: int = 16, high: int = 2048) -> list[int]:
    """Log-uniform between 16 and 2048 tokens: short texts are common, long ones rare but costly,
    so padding and packing matter as in real corpora."""
    return [int(math.exp(rng.uniform(math.log(low), math.log(high)))) for _ in range(count)]


def write_json(result: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path}")
