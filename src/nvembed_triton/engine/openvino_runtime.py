"""A sentence-transformers model's transformer run through OpenVINO on a CPU. At load the library's
torch module is traced once and converted in memory by OpenVINO's PyTorch frontend, then compiled
for the CPU in the settings' dtype (fp32 unless told); the library keeps doing tokenisation,
pooling and normalisation around it, so only the network's forward pass changes. Measured on a
2-core AMD EPYC in fp32: a lone query 2.5x and batches 1.06-1.14x as fast as torch with packed
oneDNN layers, within 1e-5 of torch's vectors (bench/RESULTS.md, "OpenVINO as the CPU engine").
Nothing is written to disk.

Why not sentence-transformers' own `backend="openvino"`: it goes through optimum-intel, which pins
an older transformers than the one NV-Embed-v2's native model is tested with. Why the frontend and
not `openvino.convert_model`: the latter starts OpenVINO's usage telemetry, which sends events over
the network unless a consent file says otherwise; a server makes no such calls."""

from __future__ import annotations

import inspect
import threading
import warnings

import numpy as np
import openvino
import torch
from openvino.frontend import FrontEndManager
from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder
from torch import nn

# Traced on two texts of different lengths, so that the trace holds the padding path (a mask with
# zeros): a batch without padding then runs it too, with an all-ones mask, and gets the same result.
TRACE_TEXTS = ["a short text", "a somewhat longer text, so that the batch is padded"]
# The one output the library reads from a feature-extraction model's forward (its modality config).
HIDDEN_STATES = "last_hidden_state"
# One stream: every core on each pass (a lone query is the case to win).
COMPILE_CONFIG = {"PERFORMANCE_HINT": "LATENCY"}
# The settings' dtype as OpenVINO's inference precision. Always stated: on CPUs with bf16 units
# OpenVINO would otherwise compute in bf16 behind a user who asked for fp32.
PRECISIONS = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


class NotConvertible(Exception):
    """The model is not one this runtime can serve as the library would; torch keeps serving it."""


class _PositionalForward(nn.Module):
    """The transformer's forward over its inputs in a fixed order, returning the hidden states only:
    what tracing needs (positional tensors in, one tensor out)."""

    def __init__(self, model: nn.Module, input_names: list[str]):
        super().__init__()
        self.model, self.input_names = model, input_names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.input_names, tensors, strict=True)), return_dict=True)[HIDDEN_STATES]


class OpenVinoTransformer(nn.Module):
    """Stands in for the library's transformer model: takes the features the library passes and
    returns {"last_hidden_state": ...}. Each calling thread has its own infer request (a request
    serves one call at a time; a compiled model serves several requests at once)."""

    def __init__(self, compiled: openvino.CompiledModel, input_names: list[str], config):
        super().__init__()
        self.compiled, self.input_names = compiled, input_names
        self.config = config  # the library reads the model's config (e.g. its max_position_embeddings)
        self._local = threading.local()

    def forward(self, **features) -> dict[str, torch.Tensor]:
        if not hasattr(self._local, "request"):
            self._local.request = self.compiled.create_infer_request()
        inputs = [np.ascontiguousarray(features[name].numpy()) for name in self.input_names]
        # A copy of the output: the request reuses its buffer on the next call.
        hidden = self._local.request.infer(inputs, share_inputs=True, share_outputs=False)[0]
        return {HIDDEN_STATES: torch.from_numpy(hidden)}


def use_openvino(model, threads: int, dtype: str) -> str:
    """Replaces the transformer inside sentence-transformers `model` (fp32, on the CPU) by its
    OpenVINO conversion, compiled for `threads` cores to compute in `dtype` (a torch dtype name);
    returns a description for the load log.
    Raises NotConvertible, leaving the model untouched, where the library reads anything else than
    the forward pass's hidden states (or the first module is not a transformer)."""
    transformer = model[0]
    hf_model = getattr(transformer, "auto_model", None)
    modality = getattr(transformer, "modality_config", {}).get("text", {})
    if hf_model is None or modality.get("method") != "forward" or modality.get("method_output_name") != HIDDEN_STATES:
        raise NotConvertible(f"{type(transformer).__name__} with text modality {modality}")
    accepted = set(inspect.signature(hf_model.forward).parameters)
    features = model.preprocess(TRACE_TEXTS)
    input_names = [name for name, value in features.items() if isinstance(value, torch.Tensor) and name in accepted]
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # The tracer warns of each shape test it freezes; the padded trace (TRACE_TEXTS) is why they hold.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced_on = _PositionalForward(hf_model, input_names).eval()
        decoder = TorchScriptPythonDecoder(traced_on, example_input=tuple(features[name] for name in input_names))
        frontend = FrontEndManager().load_by_framework("pytorch")
        converted = frontend.convert(frontend.load(decoder))
    config = {**COMPILE_CONFIG, "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": PRECISIONS[dtype]}
    compiled = openvino.Core().compile_model(converted, "CPU", config)
    transformer.model = OpenVinoTransformer(compiled, input_names, hf_model.config)  # the torch weights are freed with it
    precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # what the CPU does: f16 may not be offered
    return f"OpenVINO {openvino.get_version().split('-')[0]}, computing in {precision}, {threads} threads"
