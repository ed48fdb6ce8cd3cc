"""leftovers.py with real processes and real /dev/shm files: a run whose processes are all gone is
swept, a run with any process alive (the launcher, or tritonserver holding the inherited lock) is
not, and nothing outside the run's names is touched."""

import json
import os
import subprocess
import sys
import time

from nvembed_triton.launcher.leftovers import DEAD_LAUNCHER_GRACE_S, SHM_DIR, RunRecord, shm_prefix, sweep


def fake_region(prefix: str, name: str):
    region = SHM_DIR / f"{prefix}{name}"
    region.write_bytes(b"\0" * 4096)
    return region


def test_a_dead_runs_regions_and_run_directory_are_swept_and_a_live_ones_are_not(tmp_path):
    records = tmp_path / "records"
    dead_dir = tmp_path / "nvembed-triton-dead"
    dead_dir.mkdir()
    dead = RunRecord.create(dead_dir, temporary=True, records_dir=records)
    live = RunRecord.create(tmp_path / "kept-run-dir", temporary=False, records_dir=records)
    dead_regions = [fake_region(dead.shm_prefix, f"region-{i}") for i in range(3)]
    live_region = fake_region(live.shm_prefix, "region")
    stranger = fake_region("triton_python_backend_shm_region_", "not-ours-" + dead.run_id)
    # A child that inherited the dead run's lock (as tritonserver does) keeps it alive until it ends.
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE,
                             pass_fds=(dead.fd,))  # fmt: skip
    try:
        os.close(dead.fd)  # the launcher is gone (kill -9): only the child holds the lock now
        assert sweep(records) == []
        assert all(region.exists() for region in dead_regions) and dead_dir.exists()
        child.stdin.close()
        child.wait(timeout=10)
        swept = sweep(records)
        assert len(swept) == 1 and f"run {dead.run_id}" in swept[0] and "3 shared-memory region(s)" in swept[0]
        assert not any(region.exists() for region in dead_regions) and not dead_dir.exists()
        assert live_region.exists() and stranger.exists()  # a live run's, and another server's
        assert not (records / f"{dead.run_id}.json").exists() and (records / f"{live.run_id}.json").exists()
    finally:
        child.kill()
        live.close(records)
        stranger.unlink(missing_ok=True)
    assert not live_region.exists() and not (records / f"{live.run_id}.json").exists()


def test_region_names_carry_the_run_id():
    assert shm_prefix("0123abcd") == "nvembed-0123abcd_"


def run_of_a_dead_launcher(tmp_path):
    """A run's record, one region of it, and the record's path; the launcher it names has exited."""
    records = tmp_path / "records"
    run = RunRecord.create(tmp_path / "nvembed-triton-run", temporary=True, records_dir=records)
    region = fake_region(run.shm_prefix, "region")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    path = records / f"{run.run_id}.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "pid": gone.pid}))
    return records, run, region, path


def test_a_run_whose_launcher_died_is_swept_once_its_last_process_ends_moments_later(tmp_path):
    """kill -9 of serve.sh, then serve.sh again at once: tritonserver follows its launcher, and its
    stubs, holding the inherited lock, follow a fraction of a second later. The new launcher waits
    for them (up to DEAD_LAUNCHER_GRACE_S) instead of leaving the run's regions to the next start."""
    records, run, region, path = run_of_a_dead_launcher(tmp_path)
    stub = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.7)"], pass_fds=(run.fd,))
    os.close(run.fd)  # only the lingering "stub" holds the lock now
    started = time.monotonic()
    swept = sweep(records)
    assert stub.poll() is not None and time.monotonic() - started < DEAD_LAUNCHER_GRACE_S
    assert len(swept) == 1 and not region.exists() and not path.exists()


def test_a_run_that_outlives_its_dead_launcher_is_left_alone(tmp_path):
    """A run still holding its lock after the grace period (a tritonserver still unloading) is not
    touched; the sweep gives up after DEAD_LAUNCHER_GRACE_S."""
    records, run, region, path = run_of_a_dead_launcher(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE, pass_fds=(run.fd,))
    os.close(run.fd)
    try:
        started = time.monotonic()
        assert sweep(records) == []
        assert DEAD_LAUNCHER_GRACE_S <= time.monotonic() - started < DEAD_LAUNCHER_GRACE_S + 2
        assert region.exists() and path.exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
        region.unlink(missing_ok=True)
