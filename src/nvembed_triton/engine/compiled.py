"""The backbone's dense parts through torch.compile (Inductor): each layer's RMSNorm, fused
projections, rotary, SwiGLU and residual adds, which run eagerly as dozens of small kernels per layer
(reductions in float32, elementwise products, the rotary's cat and neg, copies). Two functions are
compiled, once for every layer: a layer's weights are arguments, not guarded module attributes, and
the token dimension is dynamic. Attention stays outside (varlen or SDPA, already one kernel).

Compiling is an optimisation, never a reason for the model not to load: a compile that fails, or
whose output differs from the eager layers' on a probe, leaves the eager layers in place, and the
returned line says why."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nvembed_triton.engine.fp8 import Fp8Linear, fp8_linear
from nvembed_triton.engine.fused_mistral import Attention, DenseParts, FusedMistral, after_attention, attention_inputs

log = logging.getLogger(__name__)
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"  # Inductor's cache; importing torch._dynamo creates it, compile or not
RECOMPILE_LIMIT = 64
PROBE_TOKENS = 24  # a probe pass of this many tokens compiles the functions and checks them
# Compiled and eager layers sum in other orders: on a probe their hidden states may differ by this much,
# relative to the states' largest magnitude (fp32 ~1e-6; 16-bit floats round each layer's output).
PROBE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
FP8_PROBE_TOLERANCE = 0.1  # FP8's own rounding of the probe's inputs differs more between kernels


def linear_of(module: nn.Module) -> tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]:
    """A linear layer as a function and the tensors it takes after its input: what a compiled
    function receives instead of the module (nn.Linear: its weight; Fp8Linear: weight and scale)."""
    if isinstance(module, Fp8Linear):
        return fp8_linear, (module.weight, module.scale)
    return F.linear, (module.weight,)


def ensure_compile_cache() -> str:
    """A writable TORCHINDUCTOR_CACHE_DIR before torch._dynamo is first imported (building a model on
    the meta device imports it, and the import creates the directory, or fails): the configured one
    (serve.sh: the run directory), else a fresh one under the temporary directory, with a warning. A
    read-only root filesystem needs a writable /tmp (the image's run directory is there too).
    Returns where the cache is, for the load log."""
    wanted = os.environ.get(CACHE_ENV) or str(Path(tempfile.gettempdir()) / f"torchinductor_{os.getuid()}")
    try:
        Path(wanted).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=wanted):
            return wanted
    except OSError as error:
        fallback = tempfile.mkdtemp(prefix="nvembed-compile-cache-")  # raises where nothing can be written
        os.environ[CACHE_ENV] = fallback
        log.warning("%s %s cannot be written (%s); torch's compile cache goes to %s", CACHE_ENV, wanted, error, fallback)
        return fallback


class CompiledDenseParts(DenseParts):
    def __init__(self, shape, example: nn.Module):
        """`example`: a layer; every layer's linear layers are of its kinds."""
        super().__init__(shape)
        kinds = {name: linear_of(getattr(example, name))[0] for name in ("qkv", "out", "gate_up", "down")}

        def before(x, norm, cos, sin, qkv):
            return attention_inputs(x, norm, lambda h: kinds["qkv"](h, *qkv), cos, sin, shape)

        def after(x, attended, norm, out, gate_up, down):
            return after_attention(x, attended, lambda h: kinds["out"](h, *out), norm, lambda h: kinds["gate_up"](h, *gate_up),
                                   lambda h: kinds["down"](h, *down), shape)  # fmt: skip

        # Each model compiles the same two functions again (new closures, the same code), and each kind of
        # linear layer and layout its own graph: several models in one process (tests, fp8 beside fp16)
        # need more entries than Dynamo's default 8 per function.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        self._before = torch.compile(before, dynamic=True, fullgraph=True)
        self._after = torch.compile(after, dynamic=True, fullgraph=True)

    def before(self, layer, x, cos, sin):
        return self._before(x, layer.input_norm, cos, sin, linear_of(layer.qkv)[1])

    def after(self, layer, x, attended):
        tensors = [linear_of(getattr(layer, name))[1] for name in ("out", "gate_up", "down")]
        return self._after(x, attended, layer.post_norm, *tensors)


@torch.inference_mode()
def compile_backbone(backbone: FusedMistral) -> str:
    """Swaps in the compiled dense parts if they compile and match the eager ones on a probe pass;
    returns what the layers run as, for the load log line."""
    device = backbone.embed_tokens.weight.device
    ids = torch.randint(3, backbone.shape.vocab, (PROBE_TOKENS,), generator=torch.Generator().manual_seed(0)).to(device)
    positions = torch.arange(PROBE_TOKENS, device=device)
    attend = Attention.packed(torch.tensor([0, PROBE_TOKENS], dtype=torch.int32, device=device), PROBE_TOKENS)
    eager_parts = backbone.dense
    expected = backbone(ids, positions, attend)
    started = time.monotonic()
    try:
        backbone.dense = CompiledDenseParts(backbone.shape, backbone.layers[0])
        compiled = backbone(ids, positions, attend)
    except Exception as error:  # torch.compile raises many kinds (a C compiler, a cache it cannot write, ...)
        backbone.dense = eager_parts
        return f"eager layers (torch.compile failed: {type(error).__name__}: {str(error).splitlines()[0][:300]})"
    difference = float((compiled - expected).abs().max() / expected.abs().max())
    fp8 = isinstance(backbone.layers[0].qkv, Fp8Linear)
    tolerance = FP8_PROBE_TOLERANCE if fp8 else PROBE_TOLERANCE.get(expected.dtype, 5e-2)
    if not difference <= tolerance:  # NaN included
        backbone.dense = eager_parts
        return f"eager layers (the compiled layers differed from them by {difference:.2e} on a probe, over {tolerance:.0e})"
    return f"compiled layers (torch.compile in {time.monotonic() - started:.0f} s, probe within {difference:.1e})"
