"""lowbit.kernels.dense (the float weight's one-row adding GEMV) against float64 torch, on Triton's interpreter
in CI and compiled on CUDA; and FloatLinear, the float model's linear that uses it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from lowbit.kernels.dense import dense_gemv_add
from lowbit.model.linear import FloatLinear
from tests.kernels.common import DEVICE


def added(x, w, bias, **config):
    """What dense_gemv_add adds to a random float32 start, and that start's expected sum, in float64."""
    g = torch.Generator().manual_seed(7)
    start = torch.randn(1, w.shape[0], generator=g).to(DEVICE)
    out = start.clone()
    assert dense_gemv_add(x, w, bias, out, **config) is out
    want = x.double() @ w.double().T + (0 if bias is None else bias.double())
    return (out - start).double(), want


@pytest.mark.parametrize("n,k,dtype,config", [
    (200, 300, torch.float16, {}),  # rows and K not whole tiles
    (64, 512, torch.float16, {"BN": 16, "BK": 128, "split": 2}),  # whole tiles and splits: no masks
    (48, 1000, torch.bfloat16, {"split": 3, "BK": 64}),  # a short last split
    (33, 96, torch.float32, {"BN": 8, "BK": 32, "split": 5}),  # more splits than chunks of K
])
@pytest.mark.parametrize("bias", [False, True])
def test_dense_gemv_adds_x_times_the_weight(n, k, dtype, config, bias):
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g).to(dtype).to(DEVICE)
    x = torch.randn(1, k, generator=g).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=g).to(dtype).to(DEVICE) if bias else None
    got, want = added(x, w, b, **config)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_dense_gemv_reads_a_strided_weight_row_by_row():
    """A weight with rows further apart than K (a slice of a wider matrix) and x as a [1, 1, K] view."""
    wide = torch.randn(96, 200).half().to(DEVICE)
    w = wide[:, 40:168]
    x = torch.randn(1, 1, 128).half().to(DEVICE)
    got, want = added(x, w, None, BK=64)
    torch.testing.assert_close(got, want.view_as(got), rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_dense_gemv_refuses_mismatched_tensors():
    w = torch.randn(16, 32).half().to(DEVICE)
    x = torch.randn(1, 32).half().to(DEVICE)
    for bad_x, out in ((x[:, :16], torch.zeros(1, 16, device=DEVICE)), (x, torch.zeros(1, 8, device=DEVICE)),
                       (x, torch.zeros(1, 16, device=DEVICE).half()), (x, torch.zeros(2, 16, device=DEVICE).t())):
        with pytest.raises(ValueError, match="dense_gemv_add"):
            dense_gemv_add(bad_x, w, None, out)
    with pytest.raises(ValueError, match="unit stride"):
        dense_gemv_add(torch.randn(1, 16).half().to(DEVICE), w.t(), None, torch.zeros(1, 32, device=DEVICE))


def test_float_linear_adds_into_a_buffer_and_takes_a_swiglu_input():
    """FloatLinear is nn.Linear (state dict, forward) plus QuantLinear's keywords for one-row decode; on a CPU
    (without LOWBIT_FLOAT_GEMV=1, even under the interpreter) adding falls back to torch."""
    from lowbit.kernels.reference import silu_mul_reference

    torch.manual_seed(0)
    layer = FloatLinear(64, 48, bias=True)
    assert set(layer.state_dict()) == {"weight", "bias"} and not layer.adds_in_place(1)
    x = torch.randn(1, 64)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    start = torch.randn(1, 48)
    out = start.clone()
    assert layer(x, add_to=out) is out
    torch.testing.assert_close(out - start, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    sums = torch.randn(1, 128)
    out = start.clone()
    layer(sums, add_to=out, swiglu_input=torch.float32)
    want = F.linear(silu_mul_reference(sums), layer.weight, layer.bias)
    torch.testing.assert_close(out - start, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="in order"):
        layer(x, sorted_input=True)


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", [(4096, 12288), (11008, 4096)])
def test_float_linear_on_the_gpu_path(k, n, monkeypatch):
    """By default one row on CUDA adds through the kernel, at LLaMA-7B shapes, as cuBLAS computes;
    LOWBIT_FLOAT_GEMV=0 turns it off."""
    monkeypatch.delenv("LOWBIT_FLOAT_GEMV", raising=False)
    layer = FloatLinear(k, n, bias=False).half().cuda()
    assert layer.adds_in_place(1) and not layer.adds_in_place(2)
    monkeypatch.setenv("LOWBIT_FLOAT_GEMV", "0")
    assert not layer.adds_in_place(1)
    monkeypatch.delenv("LOWBIT_FLOAT_GEMV")
    x = torch.randn(1, k, device="cuda").half()
    out = torch.zeros(1, n, device="cuda")
    layer(x, add_to=out)
    want = x.double() @ layer.weight.double().T
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("bias", [False, True])
def test_float_model_decode_adds_into_a_float32_residual_through_the_kernel(tmp_path, monkeypatch, bias):
    """With the float GEMV (LOWBIT_FLOAT_GEMV=1: on a CPU, through the interpreter), a float model's one-row
    decode runs `Block.forward_into` (every linear adding into float32); its logits match cuBLAS's path (=0)."""
    from lowbit.engine.kv_cache import KVCache
    from lowbit.model import llama
    from lowbit.model.weights import load_model
    from tests.conftest import tiny_config, write_hf_checkpoint

    cfg = tiny_config(num_key_value_heads=2, attention_bias=bias, mlp_bias=bias)
    write_hf_checkpoint(tmp_path, cfg)
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    model, _ = load_model(tmp_path, device=DEVICE, dtype=dtype)
    assert isinstance(model.layers[0].mlp.w2, FloatLinear)
    tokens = torch.randint(0, cfg["vocab_size"], (1, 7))
    streamed = []
    into = llama.Block.forward_into
    monkeypatch.setattr(llama.Block, "forward_into", lambda self, h, *a: streamed.append(h.dtype) or into(self, h, *a))

    def step():
        cache = KVCache(model.config, 1, 16, dtype, DEVICE)
        rows = torch.arange(1, device=DEVICE)
        with torch.no_grad():
            model(tokens[:, :6].to(DEVICE), None, cache, rows)
            return model(tokens[:, 6:].to(DEVICE), torch.full((1, 1), 6, device=DEVICE), cache, rows).float().cpu()

    monkeypatch.setenv("LOWBIT_FLOAT_GEMV", "0")
    assert not model.layers[0].adds_in_place(1)
    want = step()
    assert not streamed
    monkeypatch.setenv("LOWBIT_FLOAT_GEMV", "1")
    assert model.layers[0].adds_in_place(1) and not model.layers[0].adds_in_place(2)
    got = step()
    assert streamed == [torch.float32] * cfg["num_hidden_layers"], "one-row decode took the float32 residual"
    tol = 2e-2 if dtype == torch.float16 else 1e-4
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))
