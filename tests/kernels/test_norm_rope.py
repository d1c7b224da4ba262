"""lowbit.kernels.norm_rope (Triton; the interpreter on CPU) against the torch references, and the ops
dispatch. Outputs are compared at the precision of their dtype; fresh random inputs for every case."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from lowbit.kernels import norm_rope, ops, reference
from lowbit.kernels.layout import place_channels
from tests.kernels.common import DEVICE, skip_bf16_interpreted

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def close(got, ref):
    assert got.dtype == ref.dtype and got.shape == ref.shape
    tol = TOL[got.dtype]
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol * float(ref.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 576, 1000])
@pytest.mark.parametrize("rows", [15, 1])  # one row: split into slices, each program a slice of the row
def test_rms_norm(dtype, d, rows):
    skip_bf16_interpreted(dtype)
    x = torch.randn(rows, d, device=DEVICE).to(dtype)
    r = torch.randn(rows, d, device=DEVICE).to(dtype)
    w = (torch.rand(d, device=DEVICE) + 0.5).to(dtype)
    close(norm_rope.rms_norm(x, w, 1e-5), reference.rms_norm_reference(x, w, 1e-5))
    y, h = norm_rope.rms_norm(x, w, 1e-6, residual=r)
    assert torch.equal(h, x + r)  # the same rounding as torch's add
    close(y, reference.rms_norm_reference(x + r, w, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [3, 1])
def test_rms_norm_of_a_float32_stream_in_the_compute_dtype(dtype, rows):
    """A float32 residual stream normalized for float16/bf16 linears: rounded to the compute dtype (not to
    float32, x's) before the weight multiplies, as the reference; its channels placed as asked."""
    skip_bf16_interpreted(dtype)
    d = 576
    x = torch.randn(rows, d, device=DEVICE) * 3
    w = (torch.rand(d, device=DEVICE) + 0.5).to(dtype)
    want = reference.rms_norm_reference(x, w, 1e-5, dtype)
    assert want.dtype == dtype
    close(norm_rope.rms_norm(x, w, 1e-5, dtype=dtype), want)
    sources = torch.randperm(d, device=DEVICE).to(torch.int32)
    close(norm_rope.rms_norm(x, w, 1e-5, sources=sources, dtype=dtype), want[:, sources.long()])


@pytest.mark.parametrize("fn", ["rms_norm", "add_rms_norm", "silu_mul"])
@pytest.mark.parametrize("rows", [3, 1])
def test_outputs_in_a_channel_order(fn, rows):
    """order: the output's channels come in the order an act-order linear reads them (gathered through
    `sources`), by the kernel and by the reference: bit for bit the output without an order, rearranged."""
    from lowbit.kernels.qmatmul import ChannelOrder

    d = 576
    x = torch.randn(rows, 2 * d if fn == "silu_mul" else d, device=DEVICE).half()
    r, w = torch.randn(rows, d, device=DEVICE).half(), (torch.rand(d, device=DEVICE) + 0.5).half()
    positions = torch.randperm(d, device=DEVICE).to(torch.int32)
    order = ChannelOrder(positions, torch.argsort(positions).to(torch.int32))
    call = {"rms_norm": lambda o: ops.rms_norm(x, w, 1e-5, o),
            "add_rms_norm": lambda o: ops.add_rms_norm(x, r, w, 1e-5, o),
            "silu_mul": lambda o: ops.silu_mul(x, o)}[fn]
    got, want = call(order), call(None)
    if fn == "add_rms_norm":
        assert torch.equal(got[1], want[1]), "the residual stream stays in channel order"
        got, want = got[0], want[0]
    assert torch.equal(got, place_channels(want, order))
    with pytest.raises(ValueError, match="sources must be int32"):
        norm_rope.rms_norm(x[:, :d], w, 1e-5, sources=order.sources[:-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,n_rot,d", [(3 * 4, 2 * 4, 64), (9 + 6, 12, 64), (5, 3, 96)])
def test_rope_in_place(dtype, heads, n_rot, d):
    B, T = 2, 3
    x = torch.randn(B, T, heads, d, device=DEVICE).to(dtype)
    pos = torch.randint(0, 4000, (B, T), device=DEVICE)
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2, device=DEVICE).float() / d)
    f = pos.float()[..., None] * inv
    emb = torch.cat((f, f), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    ref = reference.rope_reference(x, cos, sin, n_rot)
    got = x.clone()
    assert norm_rope.rope_(got, cos, sin, n_rot).data_ptr() == got.data_ptr()
    close(got, ref)
    assert torch.equal(got[:, :, n_rot:], x[:, :, n_rot:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_silu_mul(dtype):
    skip_bf16_interpreted(dtype)
    x = torch.randn(2, 3, 2 * 1100, device=DEVICE).to(dtype) * 4
    close(norm_rope.silu_mul(x), reference.silu_mul_reference(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_silu_mul_rounds_float32_sums_to_its_output_dtype_first(dtype):
    """dtype=: float32 gate/up sums in, the result of x.to(dtype) then silu_mul out, in one launch."""
    skip_bf16_interpreted(dtype)
    x = torch.randn(1, 2 * 700, device=DEVICE) * 4
    got = norm_rope.silu_mul(x, dtype=dtype)
    assert got.dtype == dtype and x.dtype == torch.float32
    torch.testing.assert_close(got, norm_rope.silu_mul(x.to(dtype)), rtol=0, atol=0)
    close(got, reference.silu_mul_reference(x.to(dtype)))


def test_norm_slices_fill_the_gpu_with_few_rows():
    assert norm_rope.norm_slices(1, 4096) == 16 and norm_rope.norm_slices(16, 4096) == 16
    assert norm_rope.norm_slices(64, 4096) == 4 and norm_rope.norm_slices(1024, 4096) == 1
    assert norm_rope.norm_slices(1, 576) == 2 and norm_rope.norm_slices(1, 64) == 1  # slices of >= 256 channels


def test_ops_use_the_references_off_cuda():
    x = torch.randn(2, 1, 3, 8)
    w = torch.rand(8)
    assert torch.equal(ops.rms_norm(x, w, 1e-5), reference.rms_norm_reference(x, w, 1e-5))
    cos, sin = torch.rand(2, 1, 8), torch.rand(2, 1, 8)
    assert torch.equal(ops.rope(x, cos, sin, 2), reference.rope_reference(x, cos, sin, 2))
    assert torch.equal(ops.silu_mul(x), reference.silu_mul_reference(x))
    assert torch.equal(ops.silu_mul(x, dtype=torch.float16), reference.silu_mul_reference(x.half()))
