"""Looking at a running test server from outside: its HTTP API, its processes and their memory."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

from nvembed_triton.launcher.server import stubs_of


def http(server, method: str, path: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, str]:
    """A call of Triton's HTTP API: (status, body)."""
    data = None if body is None else json.dumps(body).encode()
    url = f"http://127.0.0.1:{server.http_port}{path}"
    request = urllib.request.Request(url, method=method, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def tritonserver_pid(server) -> int:
    """The tritonserver that serve.sh (server.process) runs now: its only tritonserver child."""
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text().split()
    for pid in map(int, children):
        if Path(f"/proc/{pid}/comm").read_text().strip() == "tritonserver":
            return pid
    raise AssertionError("serve.sh has no tritonserver child")


def memory_mb(server) -> float:
    """Anonymous memory of tritonserver and all its stubs, plus the shared memory they exchange
    tensors through, counted once (tritonserver maps every stub's region)."""
    pid = tritonserver_pid(server)

    def kib(process: int, *keys: str) -> int:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{process}/status").read_text().splitlines())
        return sum(int(fields[key].split()[0]) for key in keys)

    total = kib(pid, "RssAnon", "RssShmem") + sum(kib(stub.pid, "RssAnon") for stub in stubs_of(pid))
    return total / 1024


def wait_for_api(server, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.openai_port}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError("the OpenAI API never answered /health")


def scrape_metrics(metrics_port: int) -> dict[tuple, float]:
    """(sample name, sorted labels) -> value of a server's /metrics, by prometheus-client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
