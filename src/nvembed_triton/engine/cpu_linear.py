"""Linear layers on a CPU in fp32 through oneDNN, each weight packed once at load into the layout
its kernel reads: the kernels torch.compile's CPU backend (Inductor, with freezing) uses. Eager
torch runs nn.Linear as MKL sgemm, which on AMD CPUs takes a slower path than on Intel's own, so
this is faster there with the same vectors (bench/RESULTS.md, "Fourth round: linear layers through
oneDNN"). The setting `cpu_engine` `torch` turns it off.

oneDNN builds a kernel for each row count it meets and caches up to 1,024 of them twice (torch's
cache and its own), each holding memory that grows with its rows: with passes of every token count
the server's memory kept growing (bench/RESULTS.md). So the rows a layer computes are rounded up to
one of a few sizes (`row_bucket`): the kernels are few, all built within the first minutes of load."""

from __future__ import annotations

import torch
from torch import nn

from nvembed_triton.settings import CPU_ENGINE_TORCH, EncoderSettings

# A packed layer is kept only if, on a random probe, its output is this close to nn.Linear's
# (relative to the output's largest magnitude): fp32 sums in another order differ by ~1e-7.
PROBE_RELATIVE_TOLERANCE = 1e-4
PROBE_ROWS = 3
# Rows up to this many are rounded up to a multiple of EXACT_ROWS_STEP (a query's handful of
# padding rows costs nothing measurable); above it, to one of BUCKETS_PER_DOUBLING sizes between
# each power of two, so at most 1/BUCKETS_PER_DOUBLING of a layer's work is padding.
EXACT_ROWS_UP_TO = 128
EXACT_ROWS_STEP = 8
BUCKETS_PER_DOUBLING = 8


def row_bucket(rows: int) -> int:
    """The row count a layer computes `rows` rows with: >= rows, one of a few sizes per doubling."""
    if rows <= EXACT_ROWS_UP_TO:
        return -(-rows // EXACT_ROWS_STEP) * EXACT_ROWS_STEP
    step = (1 << (rows.bit_length() - 1)) // BUCKETS_PER_DOUBLING  # rows lies in [2^k, 2^(k+1))
    return -(-rows // step) * step


def onednn_packing_available() -> bool:
    """Whether this torch build has the oneDNN linear kernels (x86 builds do: Inductor uses them)."""
    try:
        return torch.backends.mkldnn.is_available() and all(
            hasattr(torch.ops.mkldnn, op) for op in ("_reorder_linear_weight", "_linear_pointwise")
        )
    except (AttributeError, RuntimeError):  # an op namespace this build lacks
        return False


class OneDnnLinear(nn.Module):
    """nn.Linear's y = x W^T + b with W packed for oneDNN. `weight` stays an attribute (opaque,
    but with nn.Linear's dtype and device) for code that only inspects it."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        count = rows.shape[0]
        padded = row_bucket(count)
        if padded != count:  # rows are independent: the extra ones are computed and dropped
            rows = torch.nn.functional.pad(rows, (0, 0, 0, padded - count))
        out = torch.ops.mkldnn._linear_pointwise(rows, self.weight, self.bias, "none", [], "")
        return out[:count].reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def packs(linear: nn.Module) -> bool:
    """Only plain fp32 nn.Linear on the CPU: a subclass (e.g. the one inside nn.MultiheadAttention)
    may read its weight directly, which a packed weight cannot serve."""
    return type(linear) is nn.Linear and linear.weight.dtype == torch.float32 and linear.weight.device.type == "cpu"


@torch.inference_mode()
def pack_linears(model: nn.Module) -> int:
    """Replaces each packable nn.Linear in `model` by a OneDnnLinear that matches it on a random
    probe (a layer that does not stays as it was). Returns how many were replaced."""
    if not onednn_packing_available():
        return 0
    probe_seed = torch.Generator().manual_seed(0)
    packed_of: dict[int, OneDnnLinear] = {}  # a layer shared by two parents is packed once
    # By name, each looked up when its turn comes, so an unpacked weight is freed as soon as its
    # packed copy replaces it: memory peaks one layer above the model's, not twice its linears.
    names = [name for name, _ in model.named_modules(remove_duplicate=False)][1:]  # [0]: the model itself
    for qualified_name in names:
        child = model.get_submodule(qualified_name)
        if id(child) not in packed_of and packs(child):
            packed = OneDnnLinear(child)
            probe = torch.randn(PROBE_ROWS, child.in_features, generator=probe_seed)
            expected = child(probe)
            if (packed(probe) - expected).abs().max() <= PROBE_RELATIVE_TOLERANCE * expected.abs().max():
                packed_of[id(child)] = packed
        if id(child) in packed_of:
            parent_name, _, name = qualified_name.rpartition(".")
            setattr(model.get_submodule(parent_name), name, packed_of[id(child)])
    return len(packed_of)


def prepare_linears(model: nn.Module, settings: EncoderSettings) -> str:
    """Packs `model`'s linear layers where the settings ask for it (CPU, fp32, cpu_engine other than
    torch: `openvino` falls back to this where it does not apply); returns what its forward pass runs
    on, for the load log line."""
    if settings.device != "cpu" or settings.dtype != "float32" or settings.cpu_engine == CPU_ENGINE_TORCH:
        return "torch"
    return f"torch, linear layers through oneDNN ({pack_linears(model)} packed)"
