"""Memory that settles: which malloc tritonserver and its Python-backend stubs run with, and the
backend's shared-memory options. Measured with bench/bench_soak.py (bench/RESULTS.md, "Memory
under a soak"). Standard library only: the launcher reads it before anything heavy starts."""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from pathlib import Path

AUTO, GLIBC = "auto", "glibc"  # the `allocator` setting: the measured best when installed, or glibc malloc
JEMALLOC = "libjemalloc.so.2"  # Debian's and Ubuntu's libjemalloc2; NVIDIA's Triton image ships it
# Without per-thread caches: with them tritonserver's ~150 threads kept growing all soak long. The
# few threads on a request's path turn theirs on (model/threads.py); tcache_max bounds what each
# of those caches to small objects (at most ~0.3 MB a thread).
JEMALLOC_CONF = "tcache:false,tcache_max:1024"
# oneTBB (OpenVINO's threads) loads its topology library, and with it hwloc, with RTLD_DEEPBIND,
# which binds hwloc's free() to glibc's even where another malloc is preloaded: OpenVINO's first
# compile then aborts ("free(): invalid pointer"). This variable, meant for sanitizers (which also
# replace malloc), makes oneTBB load it without DEEPBIND. Set wherever a malloc is preloaded.
TBB_WITH_PRELOADED_MALLOC = {"TBB_ENABLE_SANITIZERS": "1"}


def library_dirs() -> list[Path]:
    """Where Debian and Ubuntu (multiarch, e.g. x86_64-linux-gnu), then other Linuxes, keep libraries."""
    return [Path(f"/usr/lib/{platform.machine()}-linux-gnu"), Path("/usr/lib64"), Path("/usr/lib"), Path("/usr/local/lib")]


def find_jemalloc(dirs: list[Path] | None = None) -> Path | None:
    return next((d / JEMALLOC for d in dirs or library_dirs() if (d / JEMALLOC).is_file()), None)


def allocator_environment(allocator: str = AUTO, environ: Mapping[str, str] = os.environ) -> tuple[dict[str, str], str]:
    """The environment overrides for tritonserver (its stubs inherit its environment) and a line
    for the launcher's log saying which malloc they run with.

    jemalloc without thread caches, because in the same mixed soaks it held the least memory and
    grew the slowest at the same throughput; glibc malloc kept freed activations, tcmalloc started
    higher and grew faster, a tuned glibc served half the requests (bench/RESULTS.md, "Memory under
    a soak")."""
    if allocator not in (AUTO, GLIBC):
        raise ValueError(f"allocator must be {AUTO!r} or {GLIBC!r}, got {allocator!r}")
    if preloaded := environ.get("LD_PRELOAD"):  # the operator's choice, inherited as it is
        return dict(TBB_WITH_PRELOADED_MALLOC), f"malloc: LD_PRELOAD={preloaded} as set"
    if allocator == GLIBC:
        return {}, "malloc: glibc (allocator glibc)"
    if (library := find_jemalloc()) is None:
        return {}, f"malloc: glibc; {JEMALLOC} not found (apt-get install libjemalloc2), so memory grows more under load"
    conf = {} if "MALLOC_CONF" in environ else {"MALLOC_CONF": JEMALLOC_CONF}  # an operator's tuning stays
    line = f"malloc: jemalloc ({library}, {environ.get('MALLOC_CONF', JEMALLOC_CONF)})"
    return {"LD_PRELOAD": str(library), **conf, **TBB_WITH_PRELOADED_MALLOC}, line


# The Python backend's shared memory: one region per stub in /dev/shm, through which every tensor
# passes. Triton 2.51's backend (python_be.cc, r24.10) takes its first size and its growth step, and
# nothing that caps it. Each region's whole size is allocated in /dev/shm (boost sizes it with
# posix_fallocate) and never shrinks: a stub that carried an N-byte tensor, a refused request's
# included, keeps about N + one growth step until tritonserver restarts. Measured (bench/RESULTS.md):
# 5 refused 18 MiB requests left +95 MB in /dev/shm with 1 MiB steps and +320 MB with 64 MiB steps;
# a 64 MiB first size took 3.1 GB of /dev/shm at start for 49 stubs (1 MiB: 49 MB), when a public
# model ran 48 instances (1 stub per GPU now).
SHM_FIRST_BYTES = 1 << 20  # the least the backend accepts
SHM_GROWTH_BYTES = 1 << 20


def shm_arguments() -> list[str]:
    """tritonserver arguments keeping every stub's region as small as Triton 2.51 allows. They are
    its defaults, pinned: raising either (the backend's README offers both for large tensors) costs
    the difference in /dev/shm once per stub (one per model instance)."""
    return [f"--backend-config=python,shm-default-byte-size={SHM_FIRST_BYTES}",
            f"--backend-config=python,shm-growth-byte-size={SHM_GROWTH_BYTES}"]  # fmt: skip
