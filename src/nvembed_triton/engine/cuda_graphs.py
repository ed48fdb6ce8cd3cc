"""Small GPU passes replayed from CUDA graphs. Eagerly, one pass of NV-Embed-v2 launched 1,495
kernels before its projections were fused (32 layers), and for a lone query the host's launch and
dispatch time, not the GPU, sets the latency. A graph captured per (rows, padded length) bucket replays the whole pass with one
launch (measured on an H200: bench/RESULTS.md, "end to end through tritonserver"). Captured at load
for every bucket up to MAX_GRAPH_TOKENS padded tokens; larger passes run eagerly, where the GPU's
work per kernel hides the launches."""

from __future__ import annotations

import logging
import threading

import numpy as np
import torch
import torch.nn.functional as F

from nvembed_triton.engine.fused_mistral import Attention
from nvembed_triton.engine.tokenization import PAD_ID

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
LENGTH_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048)
MAX_GRAPH_TOKENS = 2048
WARM_UP_RUNS = 2  # eager runs before a capture: cuBLAS and SDPA pick their kernels outside the graph

log = logging.getLogger(__name__)


def bucket_of(rows: int, length: int) -> tuple[int, int] | None:
    """The smallest bucket a (rows, length) pass fits, or None: run it eagerly."""
    fit_rows = next((bucket for bucket in ROW_BUCKETS if bucket >= rows), None)
    fit_length = next((bucket for bucket in LENGTH_BUCKETS if bucket >= length), None)
    if fit_rows is None or fit_length is None or fit_rows * fit_length > MAX_GRAPH_TOKENS:
        return None
    return fit_rows, fit_length


def all_buckets() -> list[tuple[int, int]]:
    """Largest first, so the graphs' shared memory pool is sized by the first capture."""
    buckets = [(r, n) for r in ROW_BUCKETS for n in LENGTH_BUCKETS if r * n <= MAX_GRAPH_TOKENS]
    return sorted(buckets, key=lambda bucket: bucket[0] * bucket[1], reverse=True)


def padded_to_bucket(
    input_ids: torch.Tensor, valid: torch.Tensor, pool_from: torch.Tensor, bucket: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A right-padded pass widened to `bucket`: (input_ids, valid, pool weights). Extra rows repeat
    the first (a row with no valid token would make NaNs, harmless but noisy); extra columns are
    padding. Pool weights are 1.0 on the tokens that enter the mean (valid, from pool_from on)."""
    rows, length = input_ids.shape
    fit_rows, fit_length = bucket
    ids = torch.full((fit_rows, fit_length), PAD_ID, dtype=input_ids.dtype)
    mask = torch.zeros((fit_rows, fit_length), dtype=torch.bool)
    ids[:rows, :length], mask[:rows, :length] = input_ids, valid
    ids[rows:], mask[rows:] = ids[0], mask[0]
    starts = torch.cat([pool_from, pool_from[:1].expand(fit_rows - rows)])
    weights = (mask & (torch.arange(fit_length)[None, :] >= starts[:, None])).float()
    return ids, mask, weights


@torch.inference_mode()
def static_embed(model, input_ids: torch.Tensor, valid: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """NVEmbedModel.embed without host synchronisation or data-dependent shapes, as a capture needs:
    always the (B, 1, 1, L) key mask, and the pooling head over every position with the mean
    weighted by `weights` (the head works token by token, so padding positions change nothing)."""
    rows, length = input_ids.shape
    positions = torch.arange(length, device=input_ids.device).expand(rows, length)
    hidden = model.backbone(input_ids, positions, Attention.padded(valid))  # always masked: a graph has one path
    head_out = model.head(hidden.reshape(rows * length, -1)).view(rows, length, -1).float()
    means = (head_out * weights[..., None]).sum(dim=1) / weights.sum(dim=1, keepdim=True)
    return F.normalize(means, dim=-1)


class _Captured:
    def __init__(self, model, device: torch.device, bucket: tuple[int, int], pool) -> None:
        rows, length = bucket
        self.input_ids = torch.full((rows, length), PAD_ID, dtype=torch.long, device=device)
        self.valid = torch.ones((rows, length), dtype=torch.bool, device=device)
        self.weights = torch.ones((rows, length), dtype=torch.float32, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARM_UP_RUNS):
                static_embed(model, self.input_ids, self.valid, self.weights)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = static_embed(model, self.input_ids, self.valid, self.weights)
        self.started, self.ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def run(self, input_ids: torch.Tensor, valid: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The replay's output on the host, and the replay alone's GPU time in ms (CUDA events)."""
        self.input_ids.copy_(input_ids)
        self.valid.copy_(valid)
        self.weights.copy_(weights)
        self.started.record()
        self.graph.replay()
        self.ended.record()
        output = self.output.cpu()  # waits for the replay
        return output, self.started.elapsed_time(self.ended)


class GraphedPasses:
    """One captured graph per bucket, sharing one memory pool. The encoder's lanes call embed()
    from two threads; a graph's input and output buffers are its own, so replays take turns."""

    def __init__(self, model, device: torch.device):
        self._lock = threading.Lock()
        self._graphs: dict[tuple[int, int], _Captured] = {}
        pool = torch.cuda.graph_pool_handle()
        with torch.cuda.device(device):
            for bucket in all_buckets():
                self._graphs[bucket] = _Captured(model, device, bucket, pool)
            torch.cuda.synchronize(device)

    def __len__(self) -> int:
        return len(self._graphs)

    def embed(self, input_ids: torch.Tensor, valid: torch.Tensor, pool_from: torch.Tensor) -> tuple[np.ndarray, float]:
        """(B, D) unit FP32 vectors for a right-padded pass that fits a bucket (bucket_of), on the
        host, and the replay's GPU time in ms."""
        padded = padded_to_bucket(input_ids, valid, pool_from, bucket_of(*input_ids.shape))
        with self._lock:
            output, device_ms = self._graphs[bucket_of(*input_ids.shape)].run(*padded)
        return output[: input_ids.shape[0]].numpy(), device_ms


def capture_or_none(model, device: torch.device, enabled: bool) -> GraphedPasses | None:
    """The graphs for a GPU model, or None (a CPU, graphs turned off, or a capture that failed: the
    model then runs eagerly, as correct and only slower on small passes, and the log says why)."""
    if not enabled or device.type != "cuda":
        return None
    try:
        return GraphedPasses(model, device)
    except Exception as error:  # a capture is an optimisation: never the reason a model fails to load
        log.warning("CUDA graphs not used, every pass runs eagerly: %s: %s", type(error).__name__, error)
        return None
