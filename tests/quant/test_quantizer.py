"""lowbit.quant.quantizer: scale/zero search, fake-quantization and RTN, against hand-computed values and a
plain transcription of AutoGPTQ's `Quantizer.find_params` (auto_gptq/quantization/quantizer.py).

Scales are float16 values: the hand-computed ones below are written as the float16 number they round to.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.quant import pack
from lowbit.quant.quantizer import fake_quantize, find_params, group_params, quantize_codes, rtn, to_storage_scale

FP16_2_15 = 0.13330078125  # 2/15 in float16 (1092 * 2^-13)
FP16_3_15 = 0.199951171875  # 0.2 in float16 (1638 * 2^-13)


def ref_find_params(x, bits, sym, mse=False, grid=100, maxshrink=0.8, norm=2.4):
    """AutoGPTQ Quantizer.find_params(x, weight=True), perchannel, in float64 -- plus one line marked DEVIATION."""
    x = x.double()
    maxq = 2 ** bits - 1
    tmp = torch.zeros(x.shape[0], dtype=x.dtype)
    xmin = torch.minimum(x.min(1)[0], tmp)
    xmax = torch.maximum(x.max(1)[0], tmp)
    if sym:
        xmax = torch.maximum(torch.abs(xmin), xmax)
        tmp = xmin < 0
        if torch.any(tmp):
            xmin[tmp] = -xmax[tmp]
    tmp = (xmin == 0) & (xmax == 0)
    xmin[tmp] = -1
    xmax[tmp] = +1

    def params(lo, hi):
        scale = (hi - lo) / maxq
        scale = scale.half().double()  # DEVIATION: the scale the checkpoint stores (float16)
        zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-lo / scale)
        return scale, zero

    scale, zero = params(xmin, xmax)
    if mse:
        best = torch.full([x.shape[0]], float("inf"), dtype=x.dtype)
        for i in range(int(maxshrink * grid)):
            p = 1 - i / grid
            scale1, zero1 = params(p * xmin, p * xmax)
            q = torch.clamp(torch.round(x / scale1.unsqueeze(1)) + zero1.unsqueeze(1), 0, maxq)
            q = scale1.unsqueeze(1) * (q - zero1.unsqueeze(1))
            err = torch.sum((q - x).abs().pow(norm), 1)
            tmp = err < best
            best[tmp] = err[tmp]
            scale[tmp] = scale1[tmp]
            zero[tmp] = zero1[tmp]
    return scale, zero


# ----------------------------------------------------------------------------- hand-computed values

def test_sym_4bit_by_hand():
    W = torch.tensor([[-1.0, 0.5, 0.25, 0.0]])
    scale, zero = find_params(W, bits=4, sym=True)
    assert scale.tolist() == [FP16_2_15] and zero.tolist() == [8.0]
    # -1/s = -7.50, 0.5/s = 3.75, 0.25/s = 1.88, 0 -> round + 8
    assert quantize_codes(W, scale[:, None], zero[:, None], 15).tolist() == [[0.0, 12.0, 10.0, 8.0]]
    r = rtn(W, bits=4, group_size=-1, sym=True)
    assert r.codes.t().tolist() == [[0, 12, 10, 8]]
    assert r.zeros.tolist() == [[8]] and r.scales.dtype == torch.float16
    assert r.W_q.tolist() == [[-8 * FP16_2_15, 4 * FP16_2_15, 2 * FP16_2_15, 0.0]]
    assert r.loss == pytest.approx(((W - r.W_q) ** 2).sum().item())


def test_asym_4bit_by_hand():
    W = torch.tensor([[-1.0, 0.5, 0.25, 2.0]])
    scale, zero = find_params(W, bits=4, sym=False)
    # scale = (2 - -1) / 15 = 0.2 -> fp16; zero = round(1 / 0.19995) = 5
    assert scale.tolist() == [FP16_3_15] and zero.tolist() == [5.0]
    r = rtn(W, bits=4, group_size=-1, sym=False)
    # -5.0012 -> -5 + 5 = 0; 2.5006 -> 3 + 5 = 8; 1.2503 -> 1 + 5 = 6; 10.0024 -> 10 + 5 = 15
    assert r.codes.t().tolist() == [[0, 8, 6, 15]]
    assert r.zeros.tolist() == [[5]]
    assert r.W_q.tolist() == [[-5 * FP16_3_15, 3 * FP16_3_15, 1 * FP16_3_15, 10 * FP16_3_15]]


def test_asym_range_always_contains_zero():
    W = torch.tensor([[1.0, 2.0, 3.0]])  # all positive: xmin is 0, zero point 0
    scale, zero = find_params(W, bits=2, sym=False)
    assert scale.tolist() == [1.0] and zero.tolist() == [0.0]
    assert fake_quantize(W, scale[:, None], zero[:, None], 3).tolist() == [[1.0, 2.0, 3.0]]


@pytest.mark.parametrize("sym", [True, False])
def test_all_zero_row_uses_minus_one_plus_one(sym):
    W = torch.zeros(2, 8)
    scale, zero = find_params(W, bits=4, sym=sym)
    assert scale.tolist() == [FP16_2_15] * 2
    assert zero.tolist() == [8.0] * 2  # sym: (maxq + 1) / 2; asym: round(1 / (2/15)) = round(7.502)
    assert fake_quantize(W, scale[:, None], zero[:, None], 15).abs().max() == 0


def test_sym_row_without_negatives_uses_full_range():
    """Deliberate deviation: the references keep xmin = 0 here (scale max/maxq, upper half clipped)."""
    W = torch.tensor([[0.5, 1.0, 0.25]])
    scale, zero = find_params(W, bits=4, sym=True)
    assert scale.tolist() == [FP16_2_15] and zero.tolist() == [8.0]
    ref_scale, ref_zero = ref_find_params(W, bits=4, sym=True)
    assert ref_scale.tolist() == [torch.tensor(1 / 15).half().item()]
    ours = (fake_quantize(W, scale[:, None], zero[:, None], 15) - W).abs().max()
    theirs = (fake_quantize(W.double(), ref_scale[:, None], ref_zero[:, None], 15) - W).abs().max()
    assert ours < 0.07 and theirs > 0.5  # 1.0 lands on 7 * 2/15 for us, on 7 * 1/15 for the reference


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_8bit_and_friends_code_range(bits):
    torch.manual_seed(bits)
    W = torch.randn(16, 64)
    for sym in (True, False):
        r = rtn(W, bits, 16, sym)
        assert int(r.codes.min()) >= 0 and int(r.codes.max()) <= 2 ** bits - 1
        assert int(r.zeros.min()) >= 0 and int(r.zeros.max()) <= 2 ** bits - 1
        if sym:
            assert (r.zeros == 2 ** (bits - 1)).all()


# ----------------------------------------------------------------------------- fp16 scales

def test_scales_are_float16_exact_and_never_zero():
    s = torch.tensor([1e-12, 3e-8, 0.1, 1e6])
    t = to_storage_scale(s)
    assert torch.equal(t, t.half().float())
    assert (t > 0).all() and torch.isfinite(t).all()
    assert t[2].item() == torch.tensor(0.1).half().item()
    tiny = torch.full((1, 4), 1e-9)
    r = rtn(tiny, bits=4, group_size=-1, sym=True)
    assert torch.isfinite(r.W_q).all() and r.scales.item() > 0


# ----------------------------------------------------------------------------- against the reference

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("mse", [False, True])
def test_find_params_matches_autogptq(bits, sym, mse):
    torch.manual_seed(100 * bits + 2 * sym + mse)
    x = torch.randn(24, 40) * torch.rand(24, 1) + 0.3 * torch.randn(24, 1)
    x[:, 0] = -x[:, 0].abs() - 1e-3  # a negative in every row: the references' sym quirk stays out of play
    scale, zero = find_params(x, bits, sym, mse)
    ref_scale, ref_zero = ref_find_params(x, bits, sym, mse)
    torch.testing.assert_close(scale.double(), ref_scale, rtol=0, atol=0)
    torch.testing.assert_close(zero.double(), ref_zero, rtol=0, atol=0)


@pytest.mark.parametrize("sym", [True, False])
def test_mse_search_never_worse_than_minmax(sym):
    torch.manual_seed(1)
    x = torch.randn(32, 128)
    x[:, 0] *= 6  # an outlier per row: clipping it pays
    errs = []
    for mse in (False, True):
        s, z = find_params(x, 3, sym, mse)
        errs.append((fake_quantize(x, s[:, None], z[:, None], 7) - x).abs().pow(2.4).sum(1))
    assert (errs[1] <= errs[0]).all() and (errs[1] < errs[0]).any()


# ----------------------------------------------------------------------------- RTN

def test_rtn_groups_and_partial_last_group():
    torch.manual_seed(2)
    W = torch.randn(8, 80)
    r = rtn(W, bits=4, group_size=32, sym=False)
    assert r.scales.shape == (3, 8) and r.zeros.shape == (3, 8)
    assert torch.equal(r.g_idx, pack.default_g_idx(80, 32))
    for g, (a, b) in enumerate([(0, 32), (32, 64), (64, 80)]):
        s, z = find_params(W[:, a:b], 4, False)
        assert torch.equal(r.scales[g].float(), s) and torch.equal(r.zeros[g], z.int())
        assert torch.equal(r.W_q[:, a:b], fake_quantize(W[:, a:b], s[:, None], z[:, None], 15))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_pack_round_trip(bits, sym):
    torch.manual_seed(bits)
    W = torch.randn(40, 72, dtype=torch.bfloat16)
    r = rtn(W, bits, 32, sym, mse=True)
    t = pack.pack(r.codes, r.zeros, r.scales, r.g_idx, bits, "gptq_v2")
    assert torch.equal(pack.dequantize(t, bits, "gptq_v2", dtype=torch.float32), r.W_q)


# ----------------------------------------------------------------------------- zero points for v1 files

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("mse", [False, True])
def test_zero_min_keeps_v1_storable_zeros_and_the_range(bits, mse):
    """Rows with no negative weight get zero 0 from min-max; zero_min=1 gives 1 and a grid that still spans them."""
    torch.manual_seed(bits)
    x = torch.rand(16, 64) + 0.01  # all positive: min-max zero = 0
    x[8:] -= 0.5  # rows with negative weights: unchanged by zero_min
    maxq = (1 << bits) - 1
    s0, z0 = find_params(x, bits, sym=False, mse=mse)
    s1, z1 = find_params(x, bits, sym=False, mse=mse, zero_min=1)
    assert (z0[:8] == 0).all() and (z1 >= 1).all() and (z1 <= maxq).all()
    assert torch.equal(s1[8:], s0[8:]) and torch.equal(z1[8:], z0[8:])
    assert torch.equal(s1, s1.half().float())
    q = fake_quantize(x, s1[:, None], z1[:, None], maxq)
    if not mse:  # the grid [-s, (maxq - 1) s] spans [0, xmax] up to the float16 rounding of s: error ~ s/2
        assert ((q - x)[:8].abs() <= s1[:8, None] * (0.5 + maxq * 2 ** -11)).all()
    r = rtn(x, bits, 32, sym=False, zero_min=1)
    assert not pack.v1_zero_overflow(r.zeros, bits)
    t = pack.pack(r.codes, r.zeros, r.scales, r.g_idx, bits, "gptq")
    assert torch.equal(pack.dequantize(t, bits, "gptq", dtype=torch.float32), r.W_q)


@pytest.mark.parametrize("group_size,k", [(32, 96), (32, 80), (-1, 50), (128, 576)])
@pytest.mark.parametrize("mse", [False, True])
def test_group_params_equals_per_group_search(group_size, k, mse):
    torch.manual_seed(k)
    W = torch.randn(12, k)
    S, Z = group_params(W, group_size, 3, sym=False, mse=mse)
    step = k if group_size == -1 else group_size
    for g, g0 in enumerate(range(0, k, step)):
        s, z = find_params(W[:, g0:g0 + step], 3, False, mse)
        assert torch.equal(S[g], s) and torch.equal(Z[g], z)
