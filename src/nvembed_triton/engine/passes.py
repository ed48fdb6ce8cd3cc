"""Running planned forward passes. On a GPU, one after another: the GPU is the parallel part. On a
CPU, several passes at once, one per core, each on its own thread with one intra-op thread: for
batches of short texts, torch's intra-op threads scale poorly and wait on each other whenever
another process (the public instances, tritonserver) takes a core; passes side by side embed more
texts per second in-process and cost the encoder less CPU per query through the server
(bench/RESULTS.md, "Second round"). A lone pass keeps every intra-op thread if it is large enough
to gain from them (MIN_THREADED_PASS_TOKENS); one query runs on one thread."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, as_completed, wait

import torch

from nvembed_triton.engine.batching import padded_tokens, plan_batches, split_for_workers
from nvembed_triton.engine.text_encoder import KeepFilter

# Texts' token counts and a budget -> passes (lists of indices into the counts).
Planner = Callable[[Sequence[int], int], list[list[int]]]
# A lone pass uses every intra-op thread only from this many padded tokens; a smaller one runs on
# a pass thread with one. With OMP_WAIT_POLICY=PASSIVE (model.py) every torch op wakes the sleeping
# threads, which costs more than they add on small inputs; the two break even at about this size
# (bench/RESULTS.md, "Second round"). Passes this small are never split (batching.MIN_SPLIT_TOKENS).
MIN_THREADED_PASS_TOKENS = 128


def workers_for(device: str) -> int:
    """Passes run at once: the intra-op threads torch would use on a CPU, 1 on a GPU."""
    return torch.get_num_threads() if torch.device(device).type == "cpu" else 1


class PassRunner:
    """Each thread that calls run() (the encoder's lanes, lanes.py) has pass threads of its own, so
    one caller's long passes never hold up another's short ones."""

    def __init__(self, workers: int):
        self.workers = workers
        self._local = threading.local()

    @property
    def _pool(self) -> ThreadPoolExecutor | None:
        if self.workers == 1:
            return None
        if not hasattr(self._local, "pool"):  # torch.set_num_threads is per thread: the caller's own threads are kept
            self._local.pool = ThreadPoolExecutor(
                self.workers, thread_name_prefix="pass", initializer=torch.set_num_threads, initargs=(1,)
            )
        return self._local.pool

    def run(
        self, rows: Sequence[int], lengths: Sequence[int], max_batch_tokens: int,
        compute: Callable[[list[int]], None], keep: KeepFilter | None = None,
        planner: Planner = plan_batches, cost: Callable[[list[int]], int] | None = None,
    ) -> tuple[int, int]:  # fmt: skip
        """Plans passes over `rows` (indices into `lengths`, each row's tokens) with `planner` and
        calls compute(batch) for each with the rows `keep` still wants, asked just before the pass
        starts (always from the calling thread: keep may make IPC calls). Returns (passes run, tokens
        computed: `cost` of each pass run, by default its rows x longest row). Raises the first error
        of a pass once the running ones have ended."""
        row_lengths = [lengths[row] for row in rows]
        plan = [[rows[i] for i in batch] for batch in planner(row_lengths, max_batch_tokens)]
        plan = split_for_workers(plan, lengths, self.workers)
        computed: list[list[int]] = []
        pool = self._pool
        if pool is None or (len(plan) == 1 and padded_tokens(lengths, plan) >= MIN_THREADED_PASS_TOKENS):
            for batch in plan:
                if batch := keep(batch) if keep else batch:
                    compute(batch)
                    computed.append(batch)
        else:
            running: set = set()
            try:
                for batch in plan:
                    if len(running) == self.workers:  # a free worker first, so keep is asked late
                        done, running = wait(running, return_when=FIRST_COMPLETED)
                        for future in done:
                            future.result()
                    if batch := keep(batch) if keep else batch:
                        running.add(pool.submit(compute, batch))
                        computed.append(batch)
                for future in as_completed(running):
                    future.result()
            finally:
                wait(running)  # no pass may still write into the caller's result after this returns
        return len(computed), sum(map(cost, computed)) if cost else padded_tokens(lengths, computed)
