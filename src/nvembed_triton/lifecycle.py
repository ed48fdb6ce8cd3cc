"""What the launcher and the models share about the server's life: the flag that closes the door
during a drain, and the gauge of requests being executed. Standard library only: the front
instances import it."""

from __future__ import annotations

import os
from pathlib import Path

# The launcher creates this file when a drain stops taking new requests; the models read its path
# from the environment tritonserver passes to them.
CLOSED_FLAG_ENV = "NVEMBED_CLOSED_FLAG"
# A custom Triton metric (a gauge per model): requests inside a model's execute().
EXECUTING_METRIC = "nvembed_requests_executing"
CLOSED_MESSAGE = "the server is shutting down and takes no new requests; retry (another replica serves it)"


def is_closed() -> bool:
    flag = os.environ.get(CLOSED_FLAG_ENV)
    return bool(flag) and Path(flag).exists()


class ExecutingGauge:
    """This model's EXECUTING_METRIC series, shared by all its instances. Only inside a Triton
    Python-backend stub."""

    def __init__(self, model_name: str):
        import triton_python_backend_utils as pb_utils

        # The family must outlive its metric, so both are kept.
        self._family = pb_utils.MetricFamily(
            name=EXECUTING_METRIC, description="Requests inside the model's execute()", kind=pb_utils.MetricFamily.GAUGE
        )
        self._metric = self._family.Metric(labels={"model": model_name})

    def add(self, count: int) -> None:
        self._metric.increment(count)
