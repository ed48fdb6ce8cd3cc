"""serving/memory.py: the malloc serve.sh gives tritonserver and its stubs. Under it, a thread has
jemalloc's per-thread cache only once it asks (cache_this_thread), and what it caches is small."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from nvembed_triton.launcher.memory import allocator_environment, find_jemalloc

PROBE = """
import ctypes, json, threading
from nvembed_triton.model.threads import cache_this_thread

lib = ctypes.CDLL(None)

def read(name, kind):
    value, size = kind(), ctypes.c_size_t(ctypes.sizeof(kind))
    assert lib.mallctl(name, ctypes.byref(value), ctypes.byref(size), None, ctypes.c_size_t(0)) == 0
    return value.value

other = []
before = read(b"thread.tcache.enabled", ctypes.c_bool)
took = cache_this_thread()
after = read(b"thread.tcache.enabled", ctypes.c_bool)
thread = threading.Thread(target=lambda: other.append(read(b"thread.tcache.enabled", ctypes.c_bool)))
thread.start()
thread.join()
print(json.dumps({"before": before, "took": took, "after": after, "other thread": other[0],
                  "tcache_max": read(b"opt.tcache_max", ctypes.c_size_t)}))
"""


def run(code: str, environ: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_under_serve_shs_jemalloc_only_a_thread_that_asks_has_a_cache_and_it_holds_small_objects():
    assert find_jemalloc() is not None, "libjemalloc2 is part of the test machine's setup (.ci/run, Dockerfile)"
    environ = {key: value for key, value in os.environ.items() if key not in ("LD_PRELOAD", "MALLOC_CONF")}
    overrides, _ = allocator_environment(environ=environ)
    found = json.loads(run(PROBE, {**environ, **overrides}))
    assert found == {"before": False, "took": True, "after": True, "other thread": False, "tcache_max": 1024}


def test_under_glibc_malloc_there_is_nothing_to_ask():
    environ = {key: value for key, value in os.environ.items() if key not in ("LD_PRELOAD", "MALLOC_CONF")}
    code = "from nvembed_triton.model.threads import cache_this_thread; print(cache_this_thread())"
    assert run(code, environ).strip() == "False"
