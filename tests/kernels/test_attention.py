"""lowbit.kernels.attention.decode_attention against sdpa_reference over a cache that holds the new key:
MHA and GQA, one split and several, rows at different lengths (0 included), the output poisoned first."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from lowbit.kernels import attention
from lowbit.kernels.attention import decode_attention, num_splits, row_fill
from lowbit.kernels.partials import AttentionPartials
from lowbit.kernels.splitk import sm_count
from lowbit.kernels.reference import sdpa_reference
from tests.kernels.common import DEVICE, skip_bf16_interpreted


@pytest.mark.parametrize("H,KV,D,S,dtype", [
    (4, 4, 64, 40, torch.float32),  # MHA, one split
    (9, 3, 64, 600, torch.float32),  # SmolLM2's GQA, three splits
    (8, 2, 32, 300, torch.float16),
    (8, 1, 128, 520, torch.float16),  # MQA-like group of 8
    (8, 1, 128, 520, torch.bfloat16),
])
def test_decode_attention(H, KV, D, S, dtype, row_splits=None):
    skip_bf16_interpreted(dtype)
    B, slots = 3, 5
    kc = torch.randn(slots, KV, S, D, device=DEVICE).to(dtype)
    vc = torch.randn(slots, KV, S, D, device=DEVICE).to(dtype)
    rows = torch.tensor([3, 0, 4], device=DEVICE)
    pos = torch.tensor([S - 1, 0, 257 % S], device=DEVICE)
    qkv = torch.randn(B, 1, H + 2 * KV, D, device=DEVICE).to(dtype)
    q, k, v = qkv.split((H, KV, KV), dim=2)
    locks = torch.zeros(B * KV, dtype=torch.int32, device=DEVICE)
    expect_k, expect_v = kc.clone(), vc.clone()
    expect_k[rows, :, pos], expect_v[rows, :, pos] = k[:, 0], v[:, 0]
    out = torch.full((B, H, D), float("nan"), dtype=dtype, device=DEVICE)
    got = decode_attention(q[:, 0], k[:, 0], v[:, 0], kc, vc, rows, pos, locks, out=out, row_splits=row_splits)
    assert got.data_ptr() == out.data_ptr() and not got.isnan().any()
    assert torch.equal(kc, expect_k) and torch.equal(vc, expect_v)
    assert not locks.any(), "split counters must be left at zero"
    mask = (torch.arange(S, device=DEVICE) <= pos[:, None])[:, None, None]
    ref = sdpa_reference(q.transpose(1, 2).double(), expect_k[rows].double(), expect_v[rows].double(), mask)[:, :, 0]
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("row_splits", [1, 2, 16])
def test_a_row_takes_the_splits_its_length_needs(row_splits):
    """row_splits 1: a row takes one split per 256 positions (one program, no merge, for the shortest); 2: at
    least two; 16: all three of the grid's, the shortest row's positions leaving some empty. All match the
    reference and leave the counters at zero."""
    test_decode_attention(9, 3, 64, 600, torch.float32, row_splits)


@pytest.mark.parametrize("settings", [
    {"BLOCK": 16, "CHUNK": 64},  # many blocks a split, many splits
    {"BLOCK": 128, "CHUNK": 1024, "WAVES": 0},  # one split a row, two blocks at the longest
    {"BLOCK": 32, "WAVES": 8, "MAX_SPLITS": 32, "NUM_WARPS": 2},
])
def test_block_and_split_settings_give_the_same_attention(monkeypatch, settings):
    """The module settings `benchmarks/decode_sweep.py` tries (MHA and GQA, float32 and float16)."""
    for name, value in settings.items():
        monkeypatch.setattr(attention, name, value)
    test_decode_attention(4, 4, 64, 300, torch.float32)
    test_decode_attention(8, 8, 32, 300, torch.float16)
    test_decode_attention(9, 3, 64, 300, torch.float32)


@pytest.mark.parametrize("H,KV,D,S,row_splits", [(4, 4, 64, 300, None), (9, 3, 64, 600, 16), (8, 2, 32, 40, None)])
def test_unmerged_partials_merge_to_the_attention(H, KV, D, S, row_splits):
    """merge=False: the splits' partials (empty splits, one-split rows and GQA included) merge to what the kernel's
    own merge gives, and the cache gets the new key/value all the same."""
    B, slots = 3, 5
    kc, vc = torch.randn(slots, KV, S, D, device=DEVICE), torch.randn(slots, KV, S, D, device=DEVICE)
    rows = torch.tensor([3, 0, 4], device=DEVICE)
    pos = torch.tensor([S - 1, 0, 257 % S], device=DEVICE)
    q, k, v = torch.randn(B, 1, H + 2 * KV, D, device=DEVICE).split((H, KV, KV), dim=2)
    locks = torch.zeros(B * KV, dtype=torch.int32, device=DEVICE)
    merged = decode_attention(q[:, 0], k[:, 0], v[:, 0], kc.clone(), vc.clone(), rows, pos, locks,
                              row_splits=row_splits)
    partials = decode_attention(q[:, 0], k[:, 0], v[:, 0], kc, vc, rows, pos, locks, row_splits=row_splits,
                                merge=False)
    assert isinstance(partials, AttentionPartials) and (partials.rows, partials.heads) == (B, H)
    sms = sm_count(torch.device(DEVICE)) if DEVICE == "cuda" else 0
    assert partials.splits == num_splits(S, B * KV, sms) and not locks.any()
    torch.testing.assert_close(partials.merge(torch.float32), merged.reshape(B, H * D), rtol=1e-5, atol=1e-5)
    assert torch.equal(kc[rows, :, pos], k[:, 0]) and torch.equal(vc[rows, :, pos], v[:, 0])


@pytest.mark.parametrize("H,KV,D,S", [(4, 4, 64, 300), (8, 2, 32, 40)])
def test_unmerged_partials_placed_in_a_column_order(H, KV, D, S):
    """merge=False with an order (an act-order wo's): acc comes placed, and the partials merge to the kernel's own
    placed output, column by column."""
    from lowbit.kernels.layout import ChannelOrder, place_channels

    B = 2
    kc, vc = torch.randn(B, KV, S, D, device=DEVICE), torch.randn(B, KV, S, D, device=DEVICE)
    rows, pos = torch.tensor([1, 0], device=DEVICE), torch.tensor([S - 1, S // 3], device=DEVICE)
    q, k, v = torch.randn(B, 1, H + 2 * KV, D, device=DEVICE).split((H, KV, KV), dim=2)
    locks = torch.zeros(B * KV, dtype=torch.int32, device=DEVICE)
    positions = torch.randperm(H * D, device=DEVICE).to(torch.int32)
    order = ChannelOrder(positions, torch.argsort(positions).to(torch.int32))
    merged = decode_attention(q[:, 0], k[:, 0], v[:, 0], kc.clone(), vc.clone(), rows, pos, locks)
    partials = decode_attention(q[:, 0], k[:, 0], v[:, 0], kc, vc, rows, pos, locks, order=order, merge=False)
    assert partials.sources is order.sources and (partials.splits > 1 or S <= attention.CHUNK)
    want = place_channels(merged.reshape(B, H * D), order)
    torch.testing.assert_close(partials.merge(torch.float32), want, rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_refused():
    q = torch.zeros(1, 2, 16, device=DEVICE)
    cache = torch.zeros(1, 2, 32, 16, device=DEVICE)
    idx = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="row_splits must be at least 1"):
        decode_attention(q, q, q, cache, cache.clone(), idx, idx, torch.zeros(2, dtype=torch.int32, device=DEVICE),
                         row_splits=0)


def test_splits_grow_with_the_cache_and_fill_the_sms():
    assert num_splits(256) == 1 and num_splits(257) == 2 and num_splits(2048) == 8 and num_splits(1 << 20) == 16
    assert num_splits(384, programs=32, sms=132) == 6  # LLaMA-7B at batch 1: one split per 64 positions
    assert num_splits(2048, programs=32, sms=132) == 9 and num_splits(2048, programs=64 * 32, sms=132) == 8
    assert num_splits(40, programs=1, sms=132) == 1  # never a split without a block of positions
    assert row_fill(32, 132) == 8 and row_fill(128, 132) == 2 and row_fill(2048, 132) == 1 and row_fill(4, 0) == 1


@pytest.mark.parametrize("H,KV,D,dtype", [(9, 3, 64, torch.float32), (8, 2, 128, torch.float16)])
def test_decode_attention_applies_rope(H, KV, D, dtype):
    """With rope=(cos, sin) the kernel rotates q and the new key itself: the same as rotating first (the rope
    reference) and attending unrotated, and the cache receives the rotated key."""
    from lowbit.kernels.reference import rope_reference

    B, S = 2, 300
    kc = torch.randn(B, KV, S, D, device=DEVICE).to(dtype)
    vc = torch.randn(B, KV, S, D, device=DEVICE).to(dtype)
    rows, pos = torch.tensor([1, 0], device=DEVICE), torch.tensor([299, 5], device=DEVICE)
    qkv = torch.randn(B, 1, H + 2 * KV, D, device=DEVICE).to(dtype)
    angles = pos.double()[:, None] * torch.rand(D // 2, device=DEVICE, dtype=torch.float64)
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    rotated = rope_reference(qkv.double(), cos.double()[:, None], sin.double()[:, None], H + KV).to(dtype)
    q, k, v = qkv.split((H, KV, KV), dim=2)
    rq, rk, _ = rotated.split((H, KV, KV), dim=2)
    locks = torch.zeros(B * KV, dtype=torch.int32, device=DEVICE)
    kc2, vc2 = kc.clone(), vc.clone()
    got = decode_attention(q[:, 0], k[:, 0], v[:, 0], kc, vc, rows, pos, locks, rope=(cos, sin))
    want = decode_attention(rq[:, 0].contiguous(), rk[:, 0].contiguous(), v[:, 0], kc2, vc2, rows, pos, locks)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(kc, kc2, rtol=tol, atol=tol)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_decode_attention_rounds_float32_qkv_to_the_cache_dtype():
    """q/k/v as float32 sums (a linear that added into a float32 buffer) attend exactly as the same values
    rounded to the float16 cache first, rotated or not, and the output comes in the cache's dtype."""
    H, KV, D, B, S = 8, 2, 64, 2, 80
    kc = torch.randn(B, KV, S, D, device=DEVICE).half()
    vc = torch.randn(B, KV, S, D, device=DEVICE).half()
    rows, pos = torch.tensor([1, 0], device=DEVICE), torch.tensor([79, 5], device=DEVICE)
    qkv = torch.randn(B, 1, H + 2 * KV, D, device=DEVICE)
    angles = pos.float()[:, None] * torch.rand(D // 2, device=DEVICE)
    emb = torch.cat((angles, angles), dim=-1)
    rope = emb.cos().half(), emb.sin().half()
    for r in (None, rope):
        caches = [(kc.clone(), vc.clone()) for _ in range(2)]
        outs = []
        for t, (k_c, v_c) in zip((qkv, qkv.half()), caches):
            q, k, v = t.split((H, KV, KV), dim=2)
            locks = torch.zeros(B * KV, dtype=torch.int32, device=DEVICE)
            outs.append(decode_attention(q[:, 0], k[:, 0], v[:, 0], k_c, v_c, rows, pos, locks, rope=r))
        assert outs[0].dtype == torch.float16
        assert torch.equal(outs[0], outs[1]) and torch.equal(caches[0][0], caches[1][0])
        assert torch.equal(caches[0][1], caches[1][1])


def test_decode_attention_places_channels():
    """positions: output channel c lands at column positions[c] of its row (for an act-order wo), bit for bit
    the output without positions, rearranged; a wrong-sized positions is a clear error."""
    from lowbit.kernels.layout import place_channels
    from lowbit.kernels.qmatmul import ChannelOrder

    B, H, KV, D, S = 2, 8, 2, 32, 300
    kc = torch.randn(B, KV, S, D, device=DEVICE).half()
    vc = torch.randn(B, KV, S, D, device=DEVICE).half()
    rows, pos = torch.tensor([1, 0], device=DEVICE), torch.tensor([299, 5], device=DEVICE)
    q, k, v = torch.randn(B, H, D, device=DEVICE).half(), *torch.randn(2, B, KV, D, device=DEVICE).half()
    locks = torch.zeros(B * KV, dtype=torch.int32, device=DEVICE)
    positions = torch.randperm(H * D, device=DEVICE).to(torch.int32)
    plain = decode_attention(q, k, v, kc.clone(), vc.clone(), rows, pos, locks)
    out = torch.full((B, H, D), float("nan"), dtype=torch.float16, device=DEVICE)
    order = ChannelOrder(positions, torch.argsort(positions).to(torch.int32))
    placed = decode_attention(q, k, v, kc, vc, rows, pos, locks, out=out, order=order)
    assert torch.equal(placed.view(B, H * D), place_channels(plain.view(B, H * D), order))
    with pytest.raises(ValueError, match="positions and sources must be int32"):
        decode_attention(q, k, v, kc, vc, rows, pos, locks, order=ChannelOrder(positions[:-1], order.sources))
