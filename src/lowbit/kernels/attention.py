"""Decode attention over the static KV cache, fused with RoPE and with appending the new token's key and value.

One launch per layer and step: program (b, kv head, split) rotates the row's query and new key, reads the
cached positions of its split up to row b's position, and the split that holds that position also writes the
new key/value into the cache (and uses them from registers). The query heads that share a kv head (GQA) are
one tensor-core tile. Splits (flash-decoding) keep the SMs busy at batch 1; the last split to finish merges the
partial softmaxes in a fixed order (deterministic) and resets its counter, so nothing else is launched (or,
with merge=False, every split leaves its partial for the next kernel to merge: `lowbit.kernels.partials`). A row
spreads over the splits its length needs, or more while the batch leaves SMs idle (`row_fill`); the splits
left over have nothing to do, and a row that one split holds is written with no merge. Reads stop at each
row's length, not at the cache's. With PDL, each program reads its row's slot and position, the rope tables
and its first block of cached keys/values before waiting for wqkv: the attention is latency-bound, and those
reads then overlap the kernel before (a 7B decode step spent 8.8 us a layer in it, 14 % of the step). The
torch reference is `lowbit.kernels.reference.sdpa_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit.kernels.layout import ChannelOrder
from lowbit.kernels.partials import AttentionPartials
from lowbit.kernels.splitk import sm_count
from lowbit.kernels.sync import fence_gpu, interpreting, pdl_launch, release_next, trace, wait_previous

# Tried in a whole 7B batch-1 decode step (`benchmarks/decode_sweep.py --attention`, H100, 2026-12-07): blocks of
# 16/32 with more splits, 128/256 positions (8 warps), one split a row: -2 % to +20 % at position 200, +2 % to
# +45 % at 1500 (blocks of 32: -1.9 % at 200, +2.5 % at 1500), so these stay.
BLOCK = 64  # cached positions per loop step
CHUNK = 256  # at least one split per this many cache positions
MAX_SPLITS = 16
NUM_WARPS = 4
WAVES = 2  # and enough splits for about this many programs per SM (batch 1 of LLaMA-7B: 32 heads x 9 splits)


@triton.jit
def _rotate(x, ptr, d, dm, c, s, HALF):
    """RoPE of a [.., BD] row tile x loaded from ptr + d: x*cos + (-x2, x1)*sin in float32, rounded once."""
    partner = tl.where(d < HALF, d + HALF, d - HALF)
    other = tl.load(ptr + partner, mask=dm, other=0.0).to(x.dtype).to(tl.float32)  # rounded as x was
    sign = tl.where(d < HALF, -1.0, 1.0)
    return (x.to(tl.float32) * c + sign * other * s).to(x.dtype)


@triton.jit
def _cached_block(kc_ptr, vc_ptr, cache, t0, end, p, d, dm, stride_ct, BLOCK: tl.constexpr):
    """The cached keys and values of positions t0 .. t0 + BLOCK (zeros past `end` and at p, the new token's)."""
    t = t0 + tl.arange(0, BLOCK)
    old = ((t < end) & (t != p))[:, None] & dm[None, :]
    offs = cache + t[:, None].to(tl.int64) * stride_ct + d[None, :]
    return tl.load(kc_ptr + offs, mask=old, other=0.0), tl.load(vc_ptr + offs, mask=old, other=0.0)


@triton.jit
def _attend_block(q, k, v, t0, end, p, k_new, v_new, m_i, l_i, acc, qk_scale, BLOCK: tl.constexpr,
                  IEEE: tl.constexpr):
    """One block of positions into the online softmax (m_i, l_i, acc): k/v from `_cached_block`, the new token's
    key and value put in at p."""
    t = t0 + tl.arange(0, BLOCK)
    k = tl.where((t == p)[:, None], k_new[None, :], k)
    v = tl.where((t == p)[:, None], v_new[None, :], v)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where((t < end)[None, :], s * qk_scale, float("-inf"))  # log2 units
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    e = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(e, axis=1)
    if IEEE:
        pv = tl.dot(e, v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(e.to(v.dtype), v)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _store_partial(ws_ptr, b64, kvh, n_kv, g, gm, d, split, m_i, l_i, acc, channel, D, G: tl.constexpr,
                   SPLITS: tl.constexpr, BD: tl.constexpr, PLACED: tl.constexpr):
    """A split's partial softmax of its query heads' rows (`partials.AttentionPartials`' layout: m at ws[e], l at
    ws[n + e], acc at ws[2n + e * BD], e = row * SPLITS + split; PLACED: acc at ws[2n + (b * SPLITS + split) * C
    + channel], C = the heads' channels, `channel` already placed) -> (rows, n)."""
    row = (b64 * n_kv + kvh) * G + g
    n_ml = tl.num_programs(0).to(tl.int64) * n_kv * G * SPLITS
    ml = row * SPLITS + split
    tl.store(ws_ptr + ml, m_i, mask=gm)
    tl.store(ws_ptr + n_ml + ml, l_i, mask=gm)
    if PLACED:
        at = 2 * n_ml + (b64 * SPLITS + split) * (n_kv * G * D) + channel
        tl.store(ws_ptr + at, acc, mask=gm[:, None] & (d < D)[None, :])
    else:
        tl.store(ws_ptr + 2 * n_ml + ml[:, None] * BD + d[None, :], acc, mask=gm[:, None])
    return row, n_ml


@triton.jit
def _decode_kernel(q_ptr, kn_ptr, vn_ptr, kc_ptr, vc_ptr, rows_ptr, pos_ptr, out_ptr, ws_ptr, lock_ptr,
                   cos_ptr, sin_ptr, place_ptr,
                   stride_qb, stride_kb, stride_vb, stride_cs, stride_ch, stride_ct, stride_ob, stride_rb,
                   n_kv, D, qk_scale,
                   fill, G: tl.constexpr, GP: tl.constexpr, BD: tl.constexpr, BLOCK: tl.constexpr,
                   SPLITS: tl.constexpr, CHUNK: tl.constexpr, SP: tl.constexpr, FENCE: tl.constexpr, IEEE: tl.constexpr,
                   ROPE: tl.constexpr, PLACE: tl.constexpr, MERGE: tl.constexpr, PDL: tl.constexpr):
    b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    g, d = tl.arange(0, GP), tl.arange(0, BD)
    gm, dm = g < G, d < D
    heads = kvh * G + g  # query heads of this kv head; q/out heads are D apart, kv heads too
    out_mask = gm[:, None] & dm[None, :]
    channel = heads[:, None] * D + d[None, :]
    if PLACE:  # the output's channels where the act-order wo reads them (constants: loaded before the wait)
        channel = tl.load(place_ptr + channel, mask=out_mask, other=0)
    release_next(PDL)
    # Before the wait (`decode_attention`: no kernel of this PDL chain writes them): the row's slot and
    # position, the rope tables, and the first block of cached keys/values (earlier steps wrote them)
    slot = tl.load(rows_ptr + b).to(tl.int64)
    p = tl.load(pos_ptr + b).to(tl.int32)
    b64 = b.to(tl.int64)
    if ROPE:
        cos = tl.load(cos_ptr + b64 * stride_rb + d, mask=dm, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + b64 * stride_rb + d, mask=dm, other=0.0).to(tl.float32)
    cache = slot * stride_cs + kvh * stride_ch
    # the row's positions, shared evenly by the splits it needs (`live`); the others have nothing to do
    chunk = tl.cdiv(tl.cdiv(p + 1, tl.minimum(SPLITS, tl.maximum(tl.cdiv(p + 1, CHUNK), fill))), BLOCK) * BLOCK
    live = tl.cdiv(p + 1, chunk)
    start = split * chunk
    end = tl.minimum(start + chunk, p + 1)
    k_first, v_first = _cached_block(kc_ptr, vc_ptr, cache, start, end, p, d, dm, stride_ct, BLOCK)
    wait_previous(PDL)
    q_row = q_ptr + b64 * stride_qb + heads[:, None] * D
    DT: tl.constexpr = kc_ptr.dtype.element_ty  # q/k/v may come in float32 (sums a linear added up)
    q = tl.load(q_row + d[None, :], mask=gm[:, None] & dm[None, :], other=0.0).to(DT)
    k_row = kn_ptr + b64 * stride_kb + kvh * D
    k_new = tl.load(k_row + d, mask=dm, other=0.0).to(DT)
    v_new = tl.load(vn_ptr + b64 * stride_vb + kvh * D + d, mask=dm, other=0.0).to(DT)
    if ROPE:  # q and the new key arrive unrotated: rotate them here instead of in a launch of their own
        q = _rotate(q, q_row, d[None, :], gm[:, None] & dm[None, :], cos[None, :], sin[None, :], D // 2)
        k_new = _rotate(k_new, k_row, d, dm, cos, sin, D // 2)
    mine = d < tl.where((p >= start) & (p < start + chunk), D, 0)  # this split appends the new key/value
    tl.store(kc_ptr + cache + p * stride_ct + d, k_new, mask=mine)
    tl.store(vc_ptr + cache + p * stride_ct + d, v_new, mask=mine)

    m_i = tl.full((GP,), float("-inf"), tl.float32)
    l_i = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, BD), tl.float32)
    if start < end:
        m_i, l_i, acc = _attend_block(q, k_first, v_first, start, end, p, k_new, v_new, m_i, l_i, acc, qk_scale,
                                      BLOCK, IEEE)
    for t0 in range(start + BLOCK, end, BLOCK):
        k, v = _cached_block(kc_ptr, vc_ptr, cache, t0, end, p, d, dm, stride_ct, BLOCK)
        m_i, l_i, acc = _attend_block(q, k, v, t0, end, p, k_new, v_new, m_i, l_i, acc, qk_scale, BLOCK, IEEE)

    out_offs = b64 * stride_ob + channel
    if not MERGE:  # every split's partial, empty ones too (m -inf, l 0, acc 0), for the kernel after to merge
        _store_partial(ws_ptr, b64, kvh, n_kv, g, gm, d, split, m_i, l_i, acc, channel, D, G, SPLITS, BD, PLACE)
    elif live == 1:  # one split holds the whole row (always so for SPLITS 1): no merge
        if split == 0:
            tl.store(out_ptr + out_offs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask)
    elif split < live:
        row, n_ml = _store_partial(ws_ptr, b64, kvh, n_kv, g, gm, d, split, m_i, l_i, acc, channel, D, G, SPLITS,
                                   BD, False)
        if FENCE:
            fence_gpu(g)
        tl.debug_barrier()
        lock = lock_ptr + b * n_kv + kvh
        if tl.atomic_add(lock, 1) == live - 1:  # the last split merges, in split order
            si = tl.arange(0, SP)
            both = gm[:, None] & (si < live)[None, :]
            m_all = tl.load(ws_ptr + row[:, None] * SPLITS + si[None, :], mask=both, other=float("-inf"),
                            cache_modifier=".cg")
            m_max = tl.where(gm, tl.max(m_all, axis=1), 0.0)
            l_all = tl.load(ws_ptr + n_ml + row[:, None] * SPLITS + si[None, :], mask=both, other=0.0,
                            cache_modifier=".cg")
            total = tl.where(gm, tl.sum(l_all * tl.exp2(m_all - m_max[:, None]), axis=1), 1.0)
            o = tl.zeros((GP, BD), tl.float32)
            for s_ in tl.static_range(SPLITS):
                ok = gm & (tl.full((GP,), s_, tl.int32) < live)
                m_s = tl.load(ws_ptr + row * SPLITS + s_, mask=ok, other=float("-inf"), cache_modifier=".cg")
                a_s = tl.load(ws_ptr + 2 * n_ml + (row * SPLITS + s_)[:, None] * BD + d[None, :],
                              mask=ok[:, None], other=0.0, cache_modifier=".cg")
                o += tl.exp2(m_s - m_max)[:, None] * a_s
            tl.store(out_ptr + out_offs, (o / total[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(lock, 0)
    trace(2)


def num_splits(max_seq_len: int, programs: int = 1, sms: int = 0) -> int:
    """Splits per (row, kv head), for a cache of max_seq_len positions and `programs` (rows x kv heads): one per
    CHUNK positions, and more while the programs would leave `sms` SMs short of WAVES each (a decode step at
    batch 1 is latency-bound: 64 programs of 3 serial blocks took 10 us a layer on an H100, 30% of the step's
    time outside the linears); at most one per BLOCK positions and MAX_SPLITS. Fixed by the cache's length, not
    the row's, so a captured graph holds for every step; each row divides its own positions among them."""
    fill = triton.cdiv(WAVES * sms, max(1, programs))
    return max(1, min(MAX_SPLITS, triton.cdiv(max_seq_len, BLOCK), max(triton.cdiv(max_seq_len, CHUNK), fill)))


def row_fill(programs: int, sms: int) -> int:
    """The splits a row spreads over at least (of `num_splits`; more where its length needs one per CHUNK
    positions): at most WAVES programs per SM over `programs` (rows x kv heads). Measured on an H100
    (benchmarks/attention_decode.py, 32 kv heads, positions 128-384): at batch 1 more splits pay (6 of 64
    positions each: 7.0 us a launch, one split 6.6-13 us), at batch 4 one or two (9.5-15.6 us against 12.6-22.4
    with three to six), since a split's merge costs about what its parallel reads save once the SMs are busy."""
    return max(1, WAVES * sms // max(1, programs))


def decode_attention(q: Tensor, k_new: Tensor, v_new: Tensor, k_cache: Tensor, v_cache: Tensor, rows: Tensor,
                     pos: Tensor, locks: Tensor, scale: float | None = None, out: Tensor | None = None,
                     rope: tuple[Tensor, Tensor] | None = None, order: ChannelOrder | None = None,
                     row_splits: int | None = None, merge: bool = True) -> Tensor | AttentionPartials:
    """One new token per row: append k/v at `pos` of cache slot `rows`, attend to positions 0..pos.

    q [B, H, D], k_new/v_new [B, KV, D] (views are fine: heads D apart, rows any stride; float32 ones are rounded
    to the cache's dtype first), k_cache/v_cache [slots, KV, S, D], rows/pos [B] int, locks int32 [>= B * KV]
    zeros (left zero). -> [B, H, D] in the cache's dtype (in `out` when given). rope = (cos, sin) [B, D]
    (half-split layout): q and k_new are rotated first (as `lowbit.kernels.norm_rope.rope_`, in float32, rounded
    once), and the rotated key is what gets cached.
    order (int32 [H*D] each): the output's channel c (head c // D, dim c % D) goes to flat column
    order.positions[c] of its row (`layout.place_channels`), the order an act-order wo reads. row_splits: the
    splits a row spreads over at least (its length may need more: one per CHUNK positions); default `row_fill`.
    merge=False: the splits' partial softmaxes come back unmerged (`AttentionPartials`, with order their acc
    placed), for the kernel after to merge as it loads them (`lowbit.kernels.partials`); out is not written.
    With PDL the kernel reads rows, pos, the rope tables and the cache's earlier positions before it waits for
    the kernel before it, so no kernel launched with PDL since the stream's last plain launch may write them
    (the model computes them with torch ops at the step's start; this kernel alone appends to its layer's cache).
    """
    B, H, D = q.shape
    n_kv, S = k_cache.shape[1], k_cache.shape[2]
    for t, name in ((q, "q"), (k_new, "k_new"), (v_new, "v_new")):
        if t.stride(2) != 1 or t.stride(1) != D:
            raise ValueError(f"{name}: heads must be D apart with D contiguous, got strides {t.stride()}")
    if k_cache.stride(3) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("k/v caches must share a layout with the head dim contiguous")
    positions = None if order is None else order.positions
    for t in () if order is None else (order.positions, order.sources):
        if t.shape != (H * D,) or t.dtype != torch.int32:
            raise ValueError(f"order's positions and sources must be int32 [{H * D}], got {t.dtype} {tuple(t.shape)}")
    if out is not None and positions is not None and (out.stride(1) != D or out.stride(2) != 1):
        raise ValueError("order needs each output row's heads contiguous")
    if row_splits is not None and row_splits < 1:
        raise ValueError(f"row_splits must be at least 1, got {row_splits}")
    if locks.numel() < B * n_kv:
        raise ValueError(f"locks has {locks.numel()} counters, needs {B * n_kv}")
    G = H // n_kv
    splits = num_splits(S, B * n_kv, sm_count(q.device) if q.is_cuda else 0)
    bd = max(16, triton.next_power_of_2(D))
    if out is None:  # (unmerged: nothing is written there)
        out = torch.empty(B, H, D, dtype=k_cache.dtype, device=q.device) if merge else q
    ws = torch.empty(B * H * splits * (bd + 2) if splits > 1 or not merge else 1, dtype=torch.float32, device=q.device)
    scale = D ** -0.5 if scale is None else scale
    cos, sin = rope if rope is not None else (q, q)
    if rope is not None and (cos.stride(-1) != 1 or sin.stride() != cos.stride() or D % 2):
        raise ValueError("rope: cos/sin need one layout with the head dim contiguous, and an even head dim")
    if B:
        _decode_kernel[(B, n_kv, splits)](
            q, k_new, v_new, k_cache, v_cache, rows, pos, out, ws, locks, cos, sin,
            positions if positions is not None else rows,
            q.stride(0), k_new.stride(0), v_new.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            out.stride(0), cos.stride(0), n_kv, D, scale * 1.4426950408889634,
            row_splits if row_splits is not None else row_fill(B * n_kv, sm_count(q.device) if q.is_cuda else 0),
            G=G, GP=max(16, triton.next_power_of_2(G)), BD=bd, BLOCK=BLOCK, SPLITS=splits, CHUNK=CHUNK,
            SP=triton.next_power_of_2(splits), FENCE=q.is_cuda and not interpreting(),
            IEEE=k_cache.dtype == torch.float32, ROPE=rope is not None, PLACE=positions is not None,
            MERGE=merge, num_warps=NUM_WARPS, **pdl_launch(q))
    return out if merge else AttentionPartials(ws, B, H, D, bd, splits, None if order is None else order.sources)
