"""Linear layers packed for oneDNN on the CPU (cpu_linear.py): same outputs as nn.Linear, only
plain fp32 layers are touched, oneDNN's kernels see a few row counts only (each is a cached kernel
holding memory), and the encoders use it on a CPU where OpenVINO does not run (NV-Embed-v2,
cpu_engine onednn) and not when told not to."""

import numpy as np
import pytest
import torch
from grpc_helpers import cosine
from sentence_transformers import SentenceTransformer
from texts import DOCUMENTS
from torch import nn

from nvembed_triton.engine.cpu_linear import OneDnnLinear, pack_linears, prepare_linears, row_bucket
from nvembed_triton.engine.encoders import load_encoder
from nvembed_triton.launcher.serve import demo_model_dir
from nvembed_triton.protocol.options import TextOptions
from nvembed_triton.settings import EncoderSettings, SettingsError


def layer(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    torch.manual_seed(in_features * 1000 + out_features)
    return nn.Linear(in_features, out_features, bias=bias).eval()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 96), (2, 7, 96), (1, 1, 96)])
def test_a_packed_layer_computes_what_nn_linear_computes(shape, bias):
    dense = layer(96, 200, bias)
    inputs = torch.randn(*shape)
    with torch.inference_mode():
        expected = inputs.double() @ dense.weight.double().T + (dense.bias.double() if bias else 0)
        packed = OneDnnLinear(dense)(inputs)
    assert packed.shape == (*shape[:-1], 200) and packed.dtype == torch.float32
    assert (packed.double() - expected).abs().max() < 1e-5


def test_row_counts_are_rounded_up_to_few_sizes_with_little_padding():
    buckets = [row_bucket(rows) for rows in range(1, 16385)]
    assert all(bucket >= rows for rows, bucket in enumerate(buckets, start=1))
    assert all(bucket - rows < 8 for rows, bucket in enumerate(buckets[:128], start=1))  # a query: a few rows
    assert all(bucket / rows <= 1 + 1 / 8 for rows, bucket in enumerate(buckets[128:], start=129))
    assert len(set(buckets[:4096])) <= 56 and len(set(buckets)) <= 72  # CPU's and GPU's max_batch_tokens
    assert all(row_bucket(bucket) == bucket for bucket in set(buckets))  # a bucket is its own bucket


def test_the_kernel_sees_only_bucketed_row_counts_and_the_rows_come_back_exact():
    """Each distinct row count is a kernel oneDNN builds and caches: counted from torch's profiler."""
    dense = layer(32, 48)
    packed = OneDnnLinear(dense)
    inputs = torch.randn(300, 32)
    with torch.inference_mode(), torch.profiler.profile(record_shapes=True) as profile:
        outputs = [packed(inputs[:rows]) for rows in range(1, 301)]
    kernel_rows = [event.input_shapes[0][0] for event in profile.events() if event.name == "mkldnn::_linear_pointwise"]
    assert len(kernel_rows) == 300 and set(kernel_rows) == {row_bucket(rows) for rows in range(1, 301)}
    assert len(set(kernel_rows)) == 16 + 8 + 2  # 8..128 by 8, 144..256 by 16, 288 and 320 by 32
    with torch.inference_mode():
        expected = dense(inputs)
    for rows, output in enumerate(outputs, start=1):
        assert output.shape == (rows, 48) and torch.allclose(output, expected[:rows], atol=1e-5)


def test_a_packed_layer_takes_non_contiguous_inputs():
    dense = layer(64, 32)
    inputs = torch.randn(64, 10).T  # (10, 64) with strides of a transpose
    with torch.inference_mode():
        assert torch.allclose(OneDnnLinear(dense)(inputs), dense(inputs), atol=1e-5)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = layer(32, 64), layer(64, 32, bias=False)
        self.attention = nn.MultiheadAttention(32, 4, batch_first=True)  # reads its out_proj weight itself
        self.bf16 = layer(32, 32).to(torch.bfloat16)
        self.shared = layer(32, 32)
        self.again = self.shared  # one layer under two names

    def forward(self, x):
        x = self.down(torch.relu(self.up(x)))
        x = x + self.attention(x, x, x, need_weights=False)[0]
        return self.again(self.shared(x)) + self.bf16(x.bfloat16()).float()


def test_only_plain_fp32_linear_layers_are_packed_and_the_output_stays():
    model = Block().eval()
    inputs = torch.randn(2, 5, 32)
    with torch.inference_mode():
        before = model(inputs)
        assert pack_linears(model) == 3  # up, down, shared (once)
        after = model(inputs)
    assert isinstance(model.up, OneDnnLinear) and isinstance(model.down, OneDnnLinear)
    assert model.shared is model.again and isinstance(model.shared, OneDnnLinear)
    assert type(model.bf16) is nn.Linear  # bf16 stays with torch
    assert not isinstance(model.attention.out_proj, OneDnnLinear)  # a subclass of nn.Linear stays
    assert (after - before).abs().max() < 1e-5


def test_a_layer_that_does_not_match_its_packed_form_stays_as_it_was():
    model = nn.Sequential(layer(16, 16), layer(16, 16))
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")  # NaN never equals anything: the probe check fails
    assert pack_linears(model) == 1
    assert isinstance(model[0], OneDnnLinear) and type(model[1]) is nn.Linear


def test_prepare_packs_only_on_a_cpu_in_fp32_with_onednn_chosen():
    def kinds(**settings):
        model = nn.Sequential(layer(8, 8))
        values = {"device": "cpu", "dtype": "float32", "max_length": 8, "max_batch_tokens": 8, **settings}
        described = prepare_linears(model, EncoderSettings("unused", **values))
        return described, type(model[0]).__name__

    assert kinds() == ("torch, linear layers through oneDNN (1 packed)", "OneDnnLinear")  # cpu_engine openvino falls back to it
    assert kinds(cpu_engine="onednn") == ("torch, linear layers through oneDNN (1 packed)", "OneDnnLinear")
    assert kinds(cpu_engine="torch") == ("torch", "Linear")
    assert kinds(dtype="bfloat16") == ("torch", "Linear")
    assert kinds(device="cuda:0") == ("torch", "Linear")


def test_cpu_engine_is_openvino_by_default_and_refuses_other_values():
    assert EncoderSettings.from_parameters({}, environ={}).cpu_engine == "openvino"
    assert EncoderSettings.from_parameters({}, environ={"NVEMBED_CPU_ENGINE": "torch"}).cpu_engine == "torch"
    with pytest.raises(SettingsError, match="cpu_engine .*must be one of openvino, onednn, torch, got 'mkl'"):
        EncoderSettings.from_parameters({"cpu_engine": "mkl"}, environ={})


def test_the_minilm_encoder_packs_with_onednn_chosen_and_matches_sentence_transformers():
    """Against the library's own eager forward pass, which packs nothing."""
    parameters = {"model_dir": str(demo_model_dir()), "device": "cpu"}
    packed = load_encoder(EncoderSettings.from_parameters({**parameters, "cpu_engine": "onednn"}))
    plain = load_encoder(EncoderSettings.from_parameters({**parameters, "cpu_engine": "torch"}))
    assert packed.runs_on.startswith("torch, linear layers through oneDNN") and plain.runs_on == "torch"
    assert any(isinstance(module, OneDnnLinear) for module in packed.model.modules())
    assert not any(isinstance(module, OneDnnLinear) for module in plain.model.modules())
    expected = SentenceTransformer(str(demo_model_dir()), device="cpu").encode(DOCUMENTS, normalize_embeddings=True)
    ours = packed.encode(DOCUMENTS, TextOptions.each(len(DOCUMENTS))).embeddings
    assert np.abs(ours - expected).max() < 1e-5 and np.all(cosine(ours, expected) >= 0.99999)


def test_the_nvembed_encoder_packs_on_a_cpu_by_default(tiny_checkpoint):
    """cpu_engine openvino (the default) applies to sentence-transformers models; NV-Embed-v2 runs torch with oneDNN."""
    encoder = load_encoder(EncoderSettings.from_parameters({"model_dir": str(tiny_checkpoint), "device": "cpu"}))
    linear_layers = sum(type(m) in (nn.Linear, OneDnnLinear) for m in encoder.model.modules())
    assert encoder.runs_on.startswith(f"torch, linear layers through oneDNN ({linear_layers} packed);")
