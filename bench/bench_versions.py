"""This project's server at two versions side by side: another checkout (--before, e.g. made with
`git worktree add /tmp/before <commit>`) against this one, both serve.sh --demo servers up
throughout, the same closed-loop cells and texts as bench_peers.py, rounds alternating which goes
first. The question it answers: did a change cost throughput anywhere, or latency at 1 client?

    .venv/bin/python bench/bench_versions.py --before /tmp/before [--seconds 10] [--repeats 3] [--json PATH]
    .venv/bin/python bench/bench_versions.py --before . --after-env NVEMBED_MAX_HELD_REQUESTS=64
    .venv/bin/python bench/bench_versions.py --before /tmp/before --stand-in [h200]

--after-env KEY=VALUE (repeatable) sets serve.sh settings for this checkout's server only: with
--before . it compares two settings of the same code. --stand-in serves the benchmark-only stand-in
(a tiny NV-Embed-v2 checkpoint's tokenizer, no network) on both sides and runs the single query cells
only: constant, the serving stack's own ceiling (bench_plumbing.py); h200, each pass as long as an
H200's, whether the stack keeps such a GPU busy. Version against version.

The other checkout's package is copied and served with this environment's packages. Its model.py
files are patched to import that copy first: the Python backend's stub embeds its own interpreter,
which ignores PYTHONPATH and reads this environment's site-packages (this checkout, installed
editable), so without the patch both servers would run this checkout's package under the other's
model.py. Prints medians (min-max) and the ratio after / before per cell; writes every cell to the JSON.
Run nothing else meanwhile (2 cores: the client shares them with the servers it measures).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path

from bench_cpu_engine_server import sweep, table
from bench_peers import WORKLOADS, make_requests, project_server
from shared import model_dir_or_tiny, write_json

MODEL_FILES = "nvembed_triton/*/model_repository/*/1/model.py"  # serving/ before the packages were renamed


def package_copy(checkout: Path, destination: Path) -> Path:
    """The checkout's src/ copied to `destination`, its model.py files importing the copy first."""
    shutil.copytree(checkout / "src", destination)
    for model_py in destination.glob(MODEL_FILES):
        text = model_py.read_text()
        docstring_end = text.index('"""', 3) + 3
        first = f"\nimport sys as _sys\n\n_sys.path.insert(0, {str(destination)!r})  # bench_versions.py: this copy first\n"
        model_py.write_text(text[:docstring_end] + first + text[docstring_end:])
    return destination


@contextmanager
def server_of(checkout: Path, scratch: Path, settings: dict[str, str] | None = None, stand_in: Path | None = None,
              stand_in_kind: str = "constant"):
    """serve.sh --demo (or the stand-in) of the checkout's package, started by a launcher running
    that package, with `settings` in its environment; yields (gRPC URL, model name)."""
    copy = package_copy(checkout, scratch / "src")
    environ = {**os.environ, **(settings or {}), "PYTHONPATH": str(copy)}
    # Launched by the checkout's own copy of this script: its launcher code matches its package.
    command = [sys.executable, str(checkout / "bench" / "bench_versions.py"), "--serve", str(scratch / "run")]
    command += ["--stand-in-dir", str(stand_in), "--stand-in", stand_in_kind] if stand_in else []
    with subprocess.Popen(command, env=environ, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as launcher:
        try:
            url, model = launcher.stdout.readline().split()
            yield url, model
        finally:
            launcher.stdin.close()  # the launcher stops its server when its input ends
            launcher.wait(timeout=120)


def serve(run_dir: Path, stand_in: Path | None, stand_in_kind: str) -> None:
    """The launcher's side (--serve): a server until this process's input ends."""
    with project_server(run_dir, stand_in=stand_in, stand_in_kind=stand_in_kind) as (url, model, _):
        print(url, model, flush=True)
        sys.stdin.read()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", type=Path, help="the other checkout (its src/ is served)")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--after-env", action="append", default=[], metavar="KEY=VALUE", help="a setting of this checkout's server")
    p.add_argument("--stand-in", nargs="?", const="constant", choices=("constant", "h200"),
                   help="the stand-in (default constant), single-query cells only")
    p.add_argument("--cells", default="", help="only the cells whose name contains this (e.g. passages)")
    p.add_argument("--json", default="bench/results/versions.json")
    p.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--stand-in-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.stand_in_dir, args.stand_in)
        return 0
    if args.before is None:
        p.error("--before is required")
    requests = make_requests(args.seed)
    with tempfile.TemporaryDirectory(prefix="nvembed-versions-") as scratch, ExitStack() as servers:
        urls = {}
        settings = dict(pair.split("=", 1) for pair in args.after_env)
        here = Path(__file__).resolve().parents[1]
        stand_in = model_dir_or_tiny(None, Path(scratch)) if args.stand_in else None
        kind = args.stand_in
        urls["after"], model = servers.enter_context(server_of(here, Path(scratch) / "after", settings, stand_in, kind))
        before = args.before.resolve()
        urls["before"], _ = servers.enter_context(server_of(before, Path(scratch) / "before", None, stand_in, kind))
        workloads = {name: w for name, w in WORKLOADS.items() if not (args.stand_in and w.passages) and args.cells in name}
        runs = asyncio.run(sweep(urls, model, requests, args, workloads))
    print(table(runs))
    setup = {**vars(args), "before": str(args.before), "serve": None, "stand_in_dir": None, "load": os.getloadavg()}
    write_json({"setup": setup, "runs": runs}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
