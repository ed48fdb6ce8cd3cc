"""Document lengths the benchmarks share: log-uniform between 16 and 2048 tokens (short texts are
common, long ones rare but costly), so padding and packing matter as in real corpora."""

from __future__ import annotations

import math
import random


def log_uniform_lengths(rng: random.Random, count: int, low: int = 16, high: int = 2048) -> list[int]:
    return [int(math.exp(rng.uniform(math.log(low), math.log(high)))) for _ in range(count)]
