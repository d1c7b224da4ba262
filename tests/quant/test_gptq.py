"""lowbit.quant.gptq against RTN, the GPTQ checkpoint format, and a naive float64 transcription of the
IST-DASLab reference loop (IST-DASLab/gptq gptq.py `fasterquant`, with AutoGPTQ's scale/zero/g_idx
bookkeeping from auto_gptq/quantization/gptq.py, and GPTQModel 7.7's group-aware reordering from
gptqmodel/quantization/gar.py + the act_group_aware branch of its gptq.py).

Deviations that the reference transcription below carries, each marked DEVIATION where it is written:
float16 scales before codes are chosen (ref_find_params), and rows rather than sequences counted as
samples of H (only the loss scale depends on it). The others (no reference sym quirk for rows without a
negative weight, a group_size=-1 scale that ignores dead columns, stable act-order argsort, larger
dampening when Cholesky fails) are kept out of these inputs and tested on their own.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from lowbit.config import QuantConfig
from lowbit.errors import LowbitError
from lowbit.quant import pack
from lowbit.quant.gptq import (
    GPTQ,
    accumulate_xtx,
    group_aware_order,
    inverse_hessian_cholesky,
)
from lowbit.quant.quantizer import find_params, rtn
from tests.quant.test_quantizer import ref_find_params


def correlated_inputs(rows: int, k: int, seed: int, draw: int = 0) -> torch.Tensor:
    """Inputs with a decaying spectrum, correlated features and a few loud channels, like LLM activations.

    `seed` fixes the distribution, `draw` the sample from it (held-out sets share the seed).
    """
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(k, k, generator=g)).Q
    loud = torch.ones(k)
    loud[torch.randperm(k, generator=g)[:4]] = 8.0
    mean = 0.1 * torch.randn(k, generator=g)
    z = torch.randn(rows, k, generator=torch.Generator().manual_seed(1000 * seed + draw))
    return (z * torch.logspace(0, -2, k)) @ basis * loud + mean


def gptq_for(W: torch.Tensor, X: torch.Tensor) -> GPTQ:
    g = GPTQ(W)
    for chunk in X.split(256):
        g.add_batch(chunk.view(2, -1, X.shape[-1]) if chunk.shape[0] % 2 == 0 else chunk)
    return g


def output_error(X: torch.Tensor, W: torch.Tensor, W_q: torch.Tensor) -> float:
    return float(((X @ W.t() - X @ W_q.t()) ** 2).sum())


# ----------------------------------------------------------------------------- naive reference

def ref_gar_perm(diag, groupsize):
    """GPTQModel gar.py (compute_local_perms / compute_global_perm / compose_final_perm /
    extend_perm_with_tail) as plain loops -> (final_perm, global_perm)."""
    num_groups = diag.numel() // groupsize
    local = [torch.argsort(diag[g * groupsize:(g + 1) * groupsize], descending=True, stable=True)
             for g in range(num_groups)]
    metric = torch.tensor([float(diag[g * groupsize:(g + 1) * groupsize].max()) for g in range(num_groups)])
    global_perm = torch.argsort(metric, descending=True, stable=True)
    final = [int(i) + int(g) * groupsize for g in global_perm for i in local[int(g)]]
    final += list(range(num_groups * groupsize, diag.numel()))  # the partial last group, in place
    return torch.tensor(final), global_perm


def ref_gptq(W, X, bits, groupsize, sym, actorder, static_groups, blocksize, percdamp=0.01, mse=False, gar=False):
    """IST-DASLab GPTQ.add_batch + fasterquant in float64, one batch -> (codes [K,N], scales, zeros, g_idx, loss, Q).

    gar: GPTQModel 7.7's act_group_aware branch of GPTQ.quantize (the column order of ref_gar_perm; grids
    found in that order, put back in group order at the end).
    """
    W = W.double().clone()
    columns = W.shape[1]
    inp = X.reshape(-1, X.shape[-1]).t().double()
    nsamples = inp.shape[1]  # DEVIATION: every row is a sample (the reference counts inp.shape[0] of [B, T, K])
    inp = math.sqrt(2 / nsamples) * inp
    H = inp.matmul(inp.t())
    maxq = 2 ** bits - 1

    scale, zero = ref_find_params(W, bits, sym, mse)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    scales, zeros, now_idx = [], [], 1
    if static_groups:
        groups = []
        for i in range(0, columns, groupsize):
            groups.append(ref_find_params(W[:, i:(i + groupsize)], bits, sym, mse))
            scales.append(groups[-1][0])
            zeros.append(groups[-1][1])
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
    if gar:  # the peer takes the order from diag(H) after the dead-column fix; no dead columns in these inputs
        perm, global_perm = ref_gar_perm(torch.diag(H), groupsize if groupsize != -1 else columns)
    if actorder or gar:
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = torch.argsort(perm)

    Losses = torch.zeros_like(W)
    Q = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H

    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if groupsize != -1:
                if not static_groups:
                    if (i1 + i) % groupsize == 0:
                        scale, zero = ref_find_params(W[:, (i1 + i):(i1 + i + groupsize)], bits, sym, mse)
                    if ((i1 + i) // groupsize) - now_idx == -1:
                        scales.append(scale)
                        zeros.append(zero)
                        now_idx += 1
                else:
                    idx = i1 + i
                    if actorder or gar:  # DEVIATION for gar: GPTQModel 7.7 takes groups[i // groupsize]
                        idx = perm[idx]  # (the sweep position's group), which mismatches its g_idx
                    scale, zero = groups[idx // groupsize]
            q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
            q = scale * (q - zero)
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d ** 2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        Losses[:, i1:i2] = Losses1 / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    gs = groupsize if groupsize != -1 else columns
    if static_groups and actorder:
        g_idx = torch.tensor([int(perm[i]) // gs for i in range(columns)])
    else:
        g_idx = torch.tensor([i // gs for i in range(columns)])
    if actorder:
        Q = Q[:, invperm]
        g_idx = g_idx[invperm]
    if gar:
        Q = Q[:, invperm]
        if groupsize != -1 and not static_groups:
            inv_global = torch.argsort(global_perm).tolist()
            scales = [scales[i] for i in inv_global] + scales[len(inv_global):]
            zeros = [zeros[i] for i in inv_global] + zeros[len(inv_global):]
    if not scales:
        scales, zeros = [scale], [zero]
    S, Z = torch.stack(scales), torch.stack(zeros)
    codes = torch.round((Q + (Z * S)[g_idx].t()) / S[g_idx].t()).t()  # AutoGPTQ QuantLinear.pack's intweight
    return codes.long(), S, Z.long(), g_idx, torch.sum(Losses).item(), Q


REF_CASES = [  # bits, group_size, sym, desc_act, static_groups, blocksize, mse, act_group_aware
    (4, -1, True, False, False, 128, False, False),
    (4, 32, False, False, False, 32, False, False),
    (3, 32, True, True, False, 24, False, False),  # groups start mid-block: scales from the block-lazy W
    (2, 16, False, True, False, 128, False, False),
    (4, 32, False, True, True, 24, False, False),  # static groups under act-order
    (8, 32, True, False, False, 24, False, False),
    (4, 16, True, True, False, 32, True, False),  # MSE shrink search inside GPTQ
    (4, 32, True, False, False, 128, False, True),  # GAR; 80 columns: the partial last group stays last
    (3, 32, False, False, False, 24, False, True),  # GAR with groups that start mid-block
    (4, 16, False, False, True, 32, False, True),  # GAR with static groups
    (4, 16, True, False, False, 32, True, True),  # GAR + MSE
    (4, -1, False, False, False, 32, False, True),  # GAR with one group: act-order, g_idx all 0
]


@pytest.mark.parametrize("bits,group_size,sym,desc_act,static,blocksize,mse,gar", REF_CASES)
def test_matches_naive_reference(bits, group_size, sym, desc_act, static, blocksize, mse, gar):
    torch.manual_seed(7)
    W = torch.randn(32, 80)
    X = correlated_inputs(512, 80, seed=3)
    cfg = QuantConfig(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, static_groups=static,
                      act_group_aware=gar)
    assert cfg.gar == gar
    r = gptq_for(W, X).quantize(cfg, blocksize=blocksize, mse=mse)
    codes, S, Z, g_idx, loss, Q = ref_gptq(W, X, bits, group_size, sym, desc_act, static, blocksize, mse=mse, gar=gar)
    assert torch.equal(r.g_idx.long(), g_idx) and r.damp_used == 0.01
    # Rows of W are quantized independently (they share only H). Float32 here and float64 there can land
    # on two sides of an fp16 rounding midpoint of a scale (or of a code's .5) and then that one row goes
    # its own way; any real difference in the algorithm would change nearly every row.
    differ = ((r.codes.long() != codes).any(0) | (r.scales.double() != S).any(0)
              | (r.zeros.long() != Z).any(0) | (r.W_q.double() != Q).any(1))
    assert int(differ.sum()) <= 1, differ.nonzero().flatten().tolist()
    assert r.loss == pytest.approx(loss, rel=1e-2 if differ.any() else 1e-4)


# ----------------------------------------------------------------------------- GPTQ beats RTN

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
def test_beats_rtn_on_output_error(bits, group_size):
    torch.manual_seed(bits)
    W = torch.randn(48, 192)
    X = correlated_inputs(1024, 192, seed=bits)
    held_out = correlated_inputs(1024, 192, seed=bits, draw=1)
    g = gptq_for(W, X)
    for sym in (True, False):
        base = output_error(held_out, W, rtn(W, bits, group_size, sym).W_q)
        for desc_act in (False, True):
            cfg = QuantConfig(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act)
            err = output_error(held_out, W, g.quantize(cfg).W_q)
            assert err < 0.5 * base, (sym, desc_act, err, base)


# ----------------------------------------------------------------------------- checkpoint format

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("desc_act,static", [(False, False), (True, False), (True, True)])
def test_pack_round_trip_is_exact(bits, desc_act, static):
    torch.manual_seed(bits)
    W = torch.randn(40, 200, dtype=torch.float16)
    g = gptq_for(W, correlated_inputs(512, 200, seed=bits))
    for sym in (True, False):
        cfg = QuantConfig(bits=bits, group_size=64, sym=sym, desc_act=desc_act, static_groups=static)
        r = g.quantize(cfg)
        assert r.codes.shape == (200, 40) and r.scales.shape == (4, 40) and r.scales.dtype == torch.float16
        for fmt in pack.FORMATS:
            if fmt == "gptq" and pack.v1_zero_overflow(r.zeros, bits):
                continue
            t = pack.pack(r.codes, r.zeros, r.scales, r.g_idx, bits, fmt)
            pack.validate(t, bits, 64, 200, 40)
            assert torch.equal(pack.dequantize(t, bits, fmt, dtype=torch.float32), r.W_q)


def test_act_order_g_idx():
    torch.manual_seed(0)
    W = torch.randn(16, 96)
    g = gptq_for(W, correlated_inputs(256, 96, seed=0))
    dynamic = g.quantize(QuantConfig(bits=4, group_size=32, desc_act=True))
    diffs = dynamic.g_idx[1:] - dynamic.g_idx[:-1]
    assert (diffs < 0).any()
    assert torch.bincount(dynamic.g_idx).tolist() == [32, 32, 32]
    perm = torch.argsort(g.H.diagonal(), descending=True)
    assert torch.equal(dynamic.g_idx[perm], torch.arange(96, dtype=torch.int32) // 32)  # groups of H-rank

    static = g.quantize(QuantConfig(bits=4, group_size=32, desc_act=True, static_groups=True))
    assert torch.equal(static.g_idx, pack.default_g_idx(96, 32))
    for grp in range(3):  # static scales are the RTN scales of the unpermuted columns
        s, z = find_params(W[:, 32 * grp:32 * (grp + 1)].float(), 4, True)
        assert torch.equal(static.scales[grp].float(), s) and torch.equal(static.zeros[grp], z.int())
    plain = g.quantize(QuantConfig(bits=4, group_size=32))
    assert torch.equal(plain.g_idx, pack.default_g_idx(96, 32))


def test_partial_last_group():
    torch.manual_seed(1)
    W = torch.randn(24, 576)
    g = gptq_for(W, correlated_inputs(1024, 576, seed=1))
    for desc_act, static in [(False, False), (True, False), (True, True)]:
        r = g.quantize(QuantConfig(bits=4, group_size=128, desc_act=desc_act, static_groups=static, sym=False))
        assert r.scales.shape == (5, 24) and r.zeros.shape == (5, 24)
        assert torch.bincount(r.g_idx).tolist() == [128, 128, 128, 128, 64]
        t = pack.pack(r.codes, r.zeros, r.scales, r.g_idx, 4, "gptq_v2")
        assert torch.equal(pack.dequantize(t, 4, "gptq_v2", dtype=torch.float32), r.W_q)
    s, z = find_params(W[:, 512:], 4, False)  # static: the last group's own 64 columns, nothing else
    assert torch.equal(r.scales[4].float(), s) and torch.equal(r.zeros[4], z.int())


# ----------------------------------------------------------------------------- GAR (act_group_aware)

@pytest.mark.parametrize("k,gs", [(96, 32), (80, 32), (20, 32), (576, 128), (64, -1)])
def test_gar_order_matches_loop_reference(k, gs):
    torch.manual_seed(k)
    d = torch.rand(k).pow(3)
    d[torch.randperm(k)[:k // 4]] = 0.5  # ties: stable sorts keep their column order
    perm, group_perm = group_aware_order(d, k if gs == -1 else gs)
    ref_perm, ref_groups = ref_gar_perm(d, k if gs == -1 else gs)
    assert torch.equal(perm, ref_perm) and torch.equal(group_perm, ref_groups)
    assert torch.equal(torch.sort(perm).values, torch.arange(k))


def test_gar_keeps_the_file_plain():
    """GAR changes which codes are found, never the layout: g_idx = i // gs, packed files dequantize exactly."""
    torch.manual_seed(13)
    W = torch.randn(24, 576)
    g = gptq_for(W, correlated_inputs(1024, 576, seed=13) * torch.linspace(0.2, 4, 576).flip(0))
    for static in (False, True):
        r = g.quantize(QuantConfig(bits=4, group_size=128, sym=False, static_groups=static))
        assert torch.equal(r.g_idx, pack.default_g_idx(576, 128)) and r.scales.shape == (5, 24)
        t = pack.pack(r.codes, r.zeros, r.scales, r.g_idx, 4, "gptq_v2")
        assert torch.equal(pack.dequantize(t, 4, "gptq_v2", dtype=torch.float32), r.W_q)
    for grp in range(5):  # each group's grid is its own columns' grid, stored at its own index
        cols = slice(128 * grp, 128 * (grp + 1))
        s, z = find_params(W[:, cols].float(), 4, False)
        assert torch.equal(r.scales[grp].float(), s) and torch.equal(r.zeros[grp], z.int())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gar_beats_plain_order_on_a_skewed_hessian(seed):
    """Loud input channels spread over the groups (a skewed diag H): visiting the loud groups and columns
    first leaves the quiet ones to absorb the error, as act-order does, while the file stays plain."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(64, 256, generator=g)
    loud = torch.exp(1.5 * torch.randn(256, generator=g))
    gq = gptq_for(W, correlated_inputs(2048, 256, seed=seed) * loud)
    held_out = correlated_inputs(2048, 256, seed=seed, draw=1) * loud
    for bits in (3, 4):
        plain = gq.quantize(QuantConfig(bits=bits, group_size=64, act_group_aware=False))
        gar = gq.quantize(QuantConfig(bits=bits, group_size=64))
        assert output_error(held_out, W, gar.W_q) < 0.9 * output_error(held_out, W, plain.W_q)


def test_gar_config():
    assert QuantConfig().gar and not QuantConfig(desc_act=True).gar
    assert not QuantConfig(act_group_aware=False).gar
    assert QuantConfig(act_group_aware=True) == QuantConfig()  # a default value is stored as the default
    with pytest.raises(LowbitError, match="needs desc_act off"):
        QuantConfig(desc_act=True, act_group_aware=True)
    for cfg in (QuantConfig(), QuantConfig(act_group_aware=False), QuantConfig(desc_act=True)):
        written = cfg.to_dict()
        assert "act_group_aware" not in written and written["meta"] == {"act_group_aware": cfg.gar}
        assert QuantConfig.from_dict(written) == cfg
    # a file that claims both (no tool writes that) still loads: the flag only says how codes were found
    assert QuantConfig.from_dict({"bits": 4, "desc_act": True, "meta": {"act_group_aware": True}}).desc_act


# ----------------------------------------------------------------------------- degenerate Hessians

@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("group_size", [-1, 16])
def test_dead_columns(desc_act, group_size):
    torch.manual_seed(2)
    W = torch.randn(16, 64)
    W[:, 5] = 50.0  # a huge weight on a dead input must not widen any scale
    X = correlated_inputs(256, 64, seed=2)
    dead = torch.tensor([0, 5, 17, 63])
    X[:, dead] = 0
    r = gptq_for(W, X).quantize(QuantConfig(bits=4, group_size=group_size, desc_act=desc_act, sym=False))
    assert torch.isfinite(r.W_q).all() and math.isfinite(r.loss)
    assert (r.W_q[:, dead] == 0).all()
    assert torch.equal(r.codes[dead].int(), r.zeros[r.g_idx[dead].long()])
    assert float(r.scales.max()) < 1.0  # group_size=-1 too (the reference takes that range before zeroing)


def test_not_positive_definite_raises_damp(caplog):
    torch.manual_seed(3)
    k = 48
    W = torch.randn(8, k)
    g = gptq_for(W, correlated_inputs(256, k, seed=3))
    basis = torch.linalg.qr(torch.randn(k, k)).Q
    eig = torch.linspace(1.0, 2.0, k)
    eig[0] = -0.05  # mean diag is 1.5: damp 1% (0.015) is not enough, 4% (0.06) is
    g.H = (basis * eig) @ basis.t()
    with caplog.at_level(logging.WARNING, logger="lowbit.quant.gptq"):
        r = g.quantize(QuantConfig(bits=4, group_size=16, damp_percent=0.01))
    assert r.damp_used == pytest.approx(0.04)
    assert len([rec for rec in caplog.records if "damp" in rec.getMessage()]) == 1
    assert torch.isfinite(r.W_q).all() and math.isfinite(r.loss)
    t = pack.pack(r.codes, r.zeros, r.scales, r.g_idx, 4, "gptq")
    assert torch.equal(pack.dequantize(t, 4, "gptq", dtype=torch.float32), r.W_q)


def test_rank_deficient_hessian_from_few_samples():
    torch.manual_seed(4)
    W = torch.randn(8, 64)
    r = gptq_for(W, torch.randn(3, 64)).quantize(QuantConfig(bits=3, group_size=32, damp_percent=0.0))
    assert r.damp_used > 0 and torch.isfinite(r.W_q).all()


def test_bad_inputs_are_refused():
    g = GPTQ(torch.randn(4, 8))
    with pytest.raises(LowbitError, match="add_batch"):
        g.quantize(QuantConfig())
    with pytest.raises(LowbitError, match="in_features=8"):
        g.add_batch(torch.randn(2, 9))
    g.add_batch(torch.full((2, 8), float("nan")))
    with pytest.raises(LowbitError, match="inf/NaN"):
        g.quantize(QuantConfig())


def test_h_is_running_mean_and_left_intact():
    torch.manual_seed(5)
    X = torch.randn(3, 10, 16, dtype=torch.bfloat16)
    g = GPTQ(torch.randn(4, 16, dtype=torch.bfloat16))
    g.add_batch(X[:1])
    g.add_batch(X[1:])
    x = X.reshape(-1, 16).float()
    torch.testing.assert_close(g.H, 2 / 30 * x.t() @ x)
    assert g.nsamples == 30
    H = g.H.clone()
    a = g.quantize(QuantConfig(bits=4, group_size=8, desc_act=True))
    assert torch.equal(g.H, H)
    b = g.quantize(QuantConfig(bits=4, group_size=8, desc_act=True))
    assert torch.equal(a.codes, b.codes) and a.W_q.dtype == torch.float32


def test_inverse_factor_equals_the_references_three_steps():
    """One Cholesky of the flipped H + a triangular inverse = cholesky(cholesky_inverse(cholesky(H)), upper)."""
    torch.manual_seed(8)
    X = correlated_inputs(2048, 96, seed=8)
    H = 2 * X.t() @ X / 2048
    H64 = H.double()
    damped = H64 + 0.01 * H64.diagonal().mean() * torch.eye(96, dtype=torch.float64)
    three = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    U64, _ = inverse_hessian_cholesky(H64.clone(), 0.01)
    torch.testing.assert_close(U64, three, rtol=1e-9, atol=1e-12)
    assert torch.equal(U64, U64.triu()) and (U64.diagonal() > 0).all()
    U32, damp = inverse_hessian_cholesky(H.clone(), 0.01)
    assert damp == 0.01 and U32.dtype == torch.float32
    assert float((U32.double() - three).norm() / three.norm()) < 1e-5


def test_inverse_factor_in_place_on_the_flipped_hessian():
    torch.manual_seed(10)
    X = correlated_inputs(1024, 64, seed=10)
    H = 2 * X.t() @ X / 1024
    U, _ = inverse_hessian_cholesky(H.clone(), 0.01)
    Hf = H.flip(0, 1)
    U2, _ = inverse_hessian_cholesky(Hf, 0.01, flipped=True)
    assert torch.equal(U, U2)


def test_asym_zero_points_fit_the_requested_format():
    """v1 files cannot store a zero point of 0: GPTQ keeps zeros >= 1 for "gptq", allows 0 for "gptq_v2"."""
    torch.manual_seed(11)
    W = torch.randn(32, 128)
    W[:, 32:64] = W[:, 32:64].abs() + 0.01  # a group with no negative weight
    g = gptq_for(W, correlated_inputs(512, 128, seed=11))
    for static in (False, True):
        v1 = g.quantize(QuantConfig(bits=4, group_size=32, sym=False, desc_act=static, static_groups=static))
        v2 = g.quantize(QuantConfig(bits=4, group_size=32, sym=False, desc_act=static, static_groups=static,
                                    checkpoint_format="gptq_v2"))
        assert int(v1.zeros.min()) >= 1 and int(v2.zeros.min()) == 0
        t = pack.pack(v1.codes, v1.zeros, v1.scales, v1.g_idx, 4, "gptq")
        assert torch.equal(pack.dequantize(t, 4, "gptq", dtype=torch.float32), v1.W_q)
        X = correlated_inputs(512, 128, seed=11, draw=1)
        assert output_error(X, W, v1.W_q) < 1.1 * output_error(X, W, v2.W_q)


def test_released_hessian_gives_the_same_result():
    torch.manual_seed(12)
    W = torch.randn(16, 96)
    X = correlated_inputs(256, 96, seed=12)
    cfg = QuantConfig(bits=3, group_size=32, desc_act=True)
    kept = gptq_for(W, X).quantize(cfg)
    g = gptq_for(W, X)
    released = g.quantize(cfg, keep_hessian=False)
    assert g.H is None and torch.equal(kept.codes, released.codes) and kept.loss == released.loss
    with pytest.raises(LowbitError, match="released"):
        g.quantize(cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_exactly(dtype):
    """Half x half -> float32 on the tensor cores equals the float64 sum of the same half inputs."""
    torch.manual_seed(9)
    x = (correlated_inputs(4096, 256, seed=9) * 4).to(dtype).cuda()
    H = torch.zeros(256, 256, device="cuda")
    accumulate_xtx(H, x[:1000], beta=0.0, alpha=1.0)
    accumulate_xtx(H, x[1000:], beta=1.0, alpha=1.0)
    x64 = x.double()
    ref = x64.t() @ x64
    assert float((H.double() - ref).norm() / ref.norm()) < 1e-6


@pytest.mark.gpu
def test_cuda_matches_cpu():
    torch.manual_seed(6)
    W = torch.randn(256, 512)
    X = correlated_inputs(2048, 512, seed=6)
    cfg = QuantConfig(bits=4, group_size=128, desc_act=True, sym=False)
    cpu = gptq_for(W, X).quantize(cfg)
    gpu = gptq_for(W.cuda(), X.cuda()).quantize(cfg)
    assert gpu.W_q.is_cuda and gpu.codes.is_cuda
    t = pack.pack(gpu.codes, gpu.zeros, gpu.scales, gpu.g_idx, 4, "gptq_v2")
    assert torch.equal(pack.dequantize(t, 4, "gptq_v2", dtype=torch.float32), gpu.W_q)
    assert torch.equal(gpu.g_idx.cpu(), cpu.g_idx)
    assert (gpu.codes.cpu() == cpu.codes).float().mean() > 0.98  # float32 rounding differs across devices
    assert gpu.loss == pytest.approx(cpu.loss, rel=0.02)
