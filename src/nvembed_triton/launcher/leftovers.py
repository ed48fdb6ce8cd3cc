"""What a server leaves on the machine, and how a later one removes it after a crash.

The Python backend keeps one shared-memory region per stub in /dev/shm (up to hundreds of MB once
large requests have passed) and removes them only on a clean unload; serve.sh's temporary run
directory goes only on a clean exit. So every run gets an id: its stubs' regions are named
`nvembed-<id>_...` (the backend's shm-region-prefix-name), and it keeps a record in RECORDS_DIR
whose lock is held by the launcher and, inherited, by tritonserver. A record whose lock is free
belongs to a run whose processes have all ended: the next serve.sh removes its regions, its
temporary run directory and the record. A live server's lock is held, so nothing of it is
touched; regions of servers this project did not start have other names and are never touched."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

RECORDS_DIR = Path(tempfile.gettempdir()) / "nvembed-triton-runs"
# A run whose launcher is dead ends within moments: tritonserver follows its parent, its stubs follow
# tritonserver a fraction of a second later, and they hold the inherited lock until then. A launcher
# started right after waits this long for such a run's lock, so it sweeps what the run leaves.
DEAD_LAUNCHER_GRACE_S = 5.0
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "nvembed-"


def shm_prefix(run_id: str) -> str:
    """The prefix of every shared-memory region of the run's stubs."""
    return f"{SHM_PREFIX}{run_id}_"


def remove_regions(prefix: str) -> int:
    """Removes this run's shared-memory regions; returns how many there were."""
    removed = 0
    for region in SHM_DIR.glob(f"{prefix}*"):
        region.unlink(missing_ok=True)
        removed += 1
    return removed


@dataclass
class RunRecord:
    """The record of a live run; its file descriptor holds the lock (pass it to child processes)."""

    run_id: str
    run_dir: Path
    temporary: bool  # the run directory goes with the run
    fd: int

    @classmethod
    def create(cls, run_dir: Path, temporary: bool, records_dir: Path = RECORDS_DIR) -> RunRecord:
        records_dir.mkdir(parents=True, exist_ok=True)
        run_id = uuid.uuid4().hex[:12]
        path = records_dir / f"{run_id}.json"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps({"run_dir": str(run_dir), "temporary": temporary, "pid": os.getpid()}).encode())
        os.set_inheritable(fd, True)  # tritonserver inherits it: the lock lasts as long as any of them
        return cls(run_id, run_dir, temporary, fd)

    @property
    def shm_prefix(self) -> str:
        return shm_prefix(self.run_id)

    def close(self, records_dir: Path = RECORDS_DIR) -> None:
        """After a clean stop: what the run left, and the record itself."""
        remove_regions(self.shm_prefix)
        if self.temporary:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        (records_dir / f"{self.run_id}.json").unlink(missing_ok=True)
        os.close(self.fd)


def sweep(records_dir: Path = RECORDS_DIR) -> list[str]:
    """Removes what runs whose processes have all ended left behind; says what, one line per run."""
    swept = []
    for path in sorted(records_dir.glob("*.json")) if records_dir.is_dir() else []:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # another launcher swept it meanwhile
            continue
        try:
            record = json.loads(os.read(fd, 1 << 16) or b"{}")
        except json.JSONDecodeError:  # a launcher writing its record this instant: it is alive
            record = {}
        launcher = record.get("pid")
        if not _lock(fd, DEAD_LAUNCHER_GRACE_S if launcher and not _alive(launcher) else 0.0):  # a live run holds it
            os.close(fd)
            continue
        try:
            regions = remove_regions(shm_prefix(path.stem))
            run_dir = Path(record.get("run_dir", ""))
            if record.get("temporary") and run_dir.name.startswith("nvembed-triton-"):
                shutil.rmtree(run_dir, ignore_errors=True)
            path.unlink(missing_ok=True)
            swept.append(f"run {path.stem} (pid {record.get('pid')}): {regions} shared-memory region(s)"
                         + (f", {run_dir}" if record.get("temporary") else ""))  # fmt: skip
        finally:
            os.close(fd)
    return swept


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    return True


def _lock(fd: int, wait_s: float) -> bool:
    """The record's lock, trying for up to wait_s; False if its run still holds it."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
