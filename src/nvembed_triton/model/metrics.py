"""The model's own Prometheus metrics on Triton's /metrics, through the Python backend's custom
metrics API. Triton's counters know nothing of texts or tokens, and count a request refused with
INVALID_ARGUMENT as a success. Only inside a Triton Python-backend stub."""

from __future__ import annotations

import itertools
import threading

from nvembed_triton.model.request_rules import CUSTOM_PROMPT
from nvembed_triton.protocol.contract import PROMPT_NAMES
from nvembed_triton.protocol.reasons import REASONS

# A gauge: requests the model holds now, from execute() until their response is sent (serve.sh's
# drain waits for it to reach 0, and its supervisor reads it as work in progress).
EXECUTING_METRIC = "nvembed_requests_executing"
EXECUTING_HELP = "Requests the model holds, until their response is sent"
# name -> (help, label names besides `model`)
COUNTERS = {
    "nvembed_texts_total": ("Texts embedded, by prompt (query, document, custom)", ("prompt",)),
    "nvembed_tokens_total": ("Tokens embedded, special and instruction tokens included, by prompt", ("prompt",)),
    "nvembed_truncated_texts_total": ("Texts cut to max_length tokens", ()),
    "nvembed_forward_passes_total": ("Forward passes run", ()),
    "nvembed_padded_tokens_total": ("Tokens the forward passes computed, padding included", ()),
    "nvembed_rejected_requests_total": (f"Requests answered with an error, by reason: {', '.join(REASONS)}", ("reason",)),
}  # fmt: skip
# Every value a label can take, known before any request: each series is created at load with 0,
# so the first scrape shows all of them (a dashboard's rate() needs a series' 0 to see its first event).
LABEL_VALUES = {"prompt": (*PROMPT_NAMES, CUSTOM_PROMPT), "reason": tuple(REASONS)}

# How often each stub's sender sends what has changed. Nothing on a request's path wakes it: waking
# a thread there cost the request a GIL hand-off (~0.1 ms, bench/RESULTS.md). A short request's hold
# and release then mostly meet in one period and cancel out, and under load each series costs one
# IPC call per period. The gauge lags by up to a period, well inside the idleness a drain waits
# for (supervisor.DRAIN_SETTLE_S, 0.5 s); Prometheus scrapes every few seconds.
SEND_INTERVAL_S = 0.2
# The executing gauge's key among the pending changes (counters' keys are (name, *labels)).
_GAUGE = (EXECUTING_METRIC,)


def series(name: str) -> list[dict[str, str]]:
    """The label sets (besides `model`) of a counter's series: one per combination of its labels' values."""
    label_names = COUNTERS[name][1]
    return [dict(zip(label_names, values, strict=True)) for values in itertools.product(*map(LABEL_VALUES.get, label_names))]


class ModelMetrics:
    """Counters and the executing gauge, labelled with the model's name; every instance of the model
    adds to the same series. Each metric update is an IPC call to the server (~50-150 µs, measured
    with bench/bench_plumbing.py and bench/bench_latency.py), so none is made on a request's path:
    hold(), release() and add() only note the change, and one sender thread per stub sends what has
    collected, summed per series, every SEND_INTERVAL_S. Every metrics IPC call is
    made under one lock (the sender's, and the log lines of the model): two metric calls at once
    from one stub crash tritonserver 2.51 (SIGSEGV in the Python backend)."""

    def __init__(self, model_name: str):
        import triton_python_backend_utils as pb_utils

        self.model_name = model_name
        self._log_warn = pb_utils.Logger.log_warn
        # Families must outlive their metrics, so both are kept.
        self._families = {
            name: pb_utils.MetricFamily(name=name, description=description, kind=pb_utils.MetricFamily.COUNTER)
            for name, (description, _) in COUNTERS.items()
        }
        self._metrics = {}
        self.ipc_lock = threading.Lock()  # around every metrics IPC call (see the class docstring)
        self._executing_family = pb_utils.MetricFamily(
            name=EXECUTING_METRIC, description=EXECUTING_HELP,
            kind=pb_utils.MetricFamily.GAUGE,
        )
        self._metrics[_GAUGE] = self._executing_family.Metric(labels={"model": model_name})
        with self.ipc_lock:  # nothing else runs yet, but every metrics IPC call goes under the lock
            for name in COUNTERS:
                for labels in series(name):
                    self._metric(name, labels)
        self._pending: dict[tuple, float] = {}  # series key -> what to add at the next send
        self._pending_lock = threading.Lock()
        self._stop = threading.Event()
        self._sender = threading.Thread(target=self._send_loop, name="metrics", daemon=True)
        self._sender.start()

    def hold(self, requests: int) -> None:
        """Requests taken on: the gauge goes up (until release(); a drain waits for it to come down)."""
        self._note(_GAUGE, requests)

    def release(self, requests: int) -> None:
        """Requests answered: the gauge comes down."""
        self._note(_GAUGE, -requests)

    def add(self, name: str, value: float, **labels: str) -> None:
        if value > 0:
            self._note((name, *sorted(labels.items())), value)

    def rejected(self, reason: str) -> None:
        self.add("nvembed_rejected_requests_total", 1, reason=reason)

    def close(self, timeout_s: float = 5.0) -> None:
        """Sends what is left and stops the sender (at unload)."""
        self._stop.set()
        self._sender.join(timeout_s)

    def _note(self, key: tuple, value: float) -> None:
        with self._pending_lock:
            self._pending[key] = self._pending.get(key, 0) + value

    def _send_loop(self) -> None:
        while not self._stop.wait(SEND_INTERVAL_S):
            self._send()
        self._send()

    def _send(self) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, {}
        with self.ipc_lock:
            for (name, *labels), value in pending.items():
                if not value:  # e.g. a request's hold and release
                    continue
                try:
                    self._metric(name, dict(labels)).increment(value)
                except Exception as error:  # one lost update must not stop the others, nor the sender
                    self._log_warn(f"metric {name} {labels}: update of {value} lost: {error!r}")

    def _metric(self, name: str, labels: dict[str, str]):
        """The series for these labels, a counter created (at 0) on first use; call under ipc_lock."""
        key = (name, *sorted(labels.items()))
        if key not in self._metrics:
            self._metrics[key] = self._families[name].Metric(labels={"model": self.model_name, **labels})
        return self._metrics[key]
