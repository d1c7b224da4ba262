"""The "mma" layout (4-bit, tensor-core kernels) against the references and the GPTQ on-disk format.

On a CPU the kernel runs through Triton's interpreter, where `lowbit.kernels.mma._emulate` stands in for its
inline PTX (same layout, same arithmetic); on CUDA the PTX itself runs. Outputs are NaN-poisoned first.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from lowbit.kernels import mma
from lowbit.kernels.layout import repack
from lowbit.kernels.qmatmul import ChannelOrder, dequantize, qmatmul
from lowbit.kernels.reference import dequant_reference
from lowbit.quant import pack
from tests.kernels.common import DEVICE
from tests.kernels.test_qmatmul import check, reference, run


def mma_weight(k, n, group_size=128, act_order=False, sym=False, fmt="gptq", seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = pack.num_groups(k, group_size)
    codes = torch.randint(0, 16, (k, n), generator=g).to(torch.uint8)
    lo, hi = (1, 16) if fmt == "gptq" else (0, 15)
    zeros = (torch.full((groups, n), 8, dtype=torch.int32) if sym
             else torch.randint(lo, hi + 1, (groups, n), generator=g, dtype=torch.int32))
    scales = (torch.rand(groups, n, generator=g) * 0.02 + 0.002).half()
    g_idx = pack.default_g_idx(k, group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    disk = pack.pack(codes, zeros, scales, g_idx, 4, fmt)
    c, z, s, gi = pack.unpack(disk, 4, fmt)
    return repack(c.to(DEVICE), z.to(DEVICE), s.to(DEVICE), gi.to(DEVICE), 4, layout="mma"), disk


CASES = [  # K, N, group_size, act_order, sym, fmt
    (256, 64, 128, False, False, "gptq"),
    (192, 48, 64, True, False, "gptq_v2"),  # one slab a run; act-order rows sorted
    (128, 32, -1, False, True, "gptq"),  # a single group
    (384, 96, 128, True, True, "gptq"),
]


@pytest.mark.parametrize("k,n,group_size,act_order,sym,fmt", CASES)
def test_mma_layout_is_gptq_dequant(k, n, group_size, act_order, sym, fmt):
    w, disk = mma_weight(k, n, group_size, act_order, sym, fmt)
    assert w.layout == "mma" and w.qweight.shape == (n // 16, 2 * k)
    expected = pack.dequantize(disk, 4, fmt, dtype=torch.float32).t()
    torch.testing.assert_close(dequant_reference(w).cpu(), expected, rtol=0, atol=0)
    torch.testing.assert_close(dequantize(w, torch.float32).cpu(), expected, rtol=0, atol=0)
    torch.testing.assert_close(dequantize(w, torch.float32, cols=(16, n)).cpu(), expected[:, 16:], rtol=0, atol=0)


@pytest.mark.parametrize("k,n,group_size,act_order,sym,fmt", CASES)
@pytest.mark.parametrize("m", [1, 3, 8, 11])
def test_mma_matmul(k, n, group_size, act_order, sym, fmt, m):
    w, _ = mma_weight(k, n, group_size, act_order, sym, fmt, seed=m)
    g = torch.Generator().manual_seed(m)
    bias = torch.randn(n, generator=g).half().to(DEVICE) if sym else None
    x = torch.randn(m, k, generator=g).half().to(DEVICE)
    check(run(x, w, bias, kernel="mma", config={"CT": 2, "split": 2}), reference(x, w, bias))


def test_mma_matmul_many_rows_and_configs():
    """More than 8 * MAX_TILES rows go in several launches; every tile count and column grouping agrees."""
    w, _ = mma_weight(128, 64, 64, False, False, "gptq")
    x = torch.randn(37, 128).half().to(DEVICE)
    ref = reference(x, w)
    for config in ({"CT": 4, "split": 1}, {"CT": 1, "split": 2}, {"CT": 2, "waves": 1}, {"CT": 2, "ahead": 2},
                   {"CT": 1, "split": 2, "ahead": 3}, {"CT": 1, "split": 2, "split_fast": True},
                   {"CT": 2, "waves": 2, "split_fast": True}):  # split_fast: one grid axis, a split count dividing sms
        check(run(x, w, kernel="mma", config=config), ref)


@pytest.mark.parametrize("k,n,group_size,act_order,sym,fmt", CASES)
@pytest.mark.parametrize("m", [1, 17, 64])
def test_mma_dot(k, n, group_size, act_order, sym, fmt, m):
    """The mma layout's tile kernel ("dot" on that layout), with the weight or x (x_first) the dot's first
    operand: tiles narrower than the weight, split K, rows past the tile masked, act-order x gathered first."""
    w, _ = mma_weight(k, n, group_size, act_order, sym, fmt, seed=m + 1)
    g = torch.Generator().manual_seed(m + 1)
    bias = torch.randn(n, generator=g).half().to(DEVICE) if sym else None
    x = torch.randn(m, k, generator=g).half().to(DEVICE)
    ref = reference(x, w, bias)
    for first in (False, True):
        for config in ({}, {"BM": 16, "CT": 2}, {"split": 2} if m <= 16 else {"BM": 32, "waves": 1}):
            check(run(x, w, bias, kernel="dot", config={**config, "x_first": first}), ref)


def test_mma_dot_refuses_what_it_cannot_read():
    from lowbit.kernels.mma_dot import mma_dot

    w, _ = mma_weight(128, 32)
    x = torch.randn(64, 128).half().to(DEVICE)
    y = torch.empty(64, 32, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="mma_dot needs"):
        mma_dot(x.float(), w, None, y)
    with pytest.raises(ValueError, match="split-K needs M <= BM"):
        mma_dot(x, w, None, y, BM=16, split=2)
    with pytest.raises(ValueError, match="mma_dot needs"):
        qmatmul(x.float(), w, kernel="dot")
    check(qmatmul(x.float(), w), reference(x.float(), w))  # float32 x through the dispatch: dequantize instead


def test_mma_swiglu_and_order():
    """The fused SwiGLU finish (one row): silu(gate) * up, optionally written in an act-order's positions."""
    from lowbit.kernels.layout import place_channels
    from lowbit.kernels.reference import silu_mul_reference

    w, _ = mma_weight(128, 64, 64, False, False, "gptq")
    x = torch.randn(1, 128).half().to(DEVICE)
    ref = silu_mul_reference(reference(x, w).half()).double()
    for config in ({"CT": 2, "split": 2}, {"CT": 2, "split": 2, "ahead": 2}):  # ahead: as the M=1 row runs it
        check(qmatmul(x, w, kernel="mma", config=config, swiglu=True), ref)
    perm = torch.randperm(32).to(torch.int32).to(DEVICE)
    order = ChannelOrder(torch.argsort(perm).to(torch.int32), perm)
    y = qmatmul(x, w, kernel="mma", swiglu=True, order=order)
    check(y, place_channels(ref, order))


@pytest.mark.parametrize("config", [{"CT": 2, "split": 3}, {"CT": 1, "split": 1}, {"CT": 4, "waves": 1},
                                    {"CT": 2, "split": 4, "ahead": 1}, {"CT": 1, "split": 1, "ahead": 2},
                                    {"CT": 2, "split": 3, "ahead": 2}, {"CT": 2, "split": 2, "ahead": 3},
                                    {"CT": 1, "split": 1, "ahead": 4}, {"CT": 2, "split": 3, "lanes": True},
                                    {"CT": 4, "split": 2, "ahead": 2, "lanes": True}])
def test_mma_adds_one_row_into_float32(config):
    """accumulate=True at M = 1: each K split adds its float32 sums (and the bias, once) into out with atomics,
    no split-K finish; the counters stay untouched."""
    w, _ = mma_weight(384, 64, 64, False, False, "gptq_v2", seed=3)
    x = torch.randn(1, 384).half().to(DEVICE)
    bias = torch.randn(64).half().to(DEVICE)
    start = torch.randn(1, 64, device=DEVICE)
    out = start.clone()
    assert qmatmul(x, w, bias, kernel="mma", config=config, accumulate=True, out=out) is out
    check(out - start, reference(x, w, bias))
    assert not w.locks.any()
    with pytest.raises(ValueError, match="add takes a contiguous float32 y"):
        mma.mma_matmul(x, w, None, out.half(), 4, add=True)
    with pytest.raises(ValueError, match="ahead is 0 to 4"):
        mma.mma_matmul(x, w, None, out, 4, add=True, ahead=5)
    with pytest.raises(ValueError, match="x_steps is a power of two"):
        mma.mma_matmul(x, w, None, out, 4, add=True, x_steps=3)


@pytest.mark.parametrize("m", [2, 9, 33])
@pytest.mark.parametrize("config", [{"CT": 2, "split": 3}, {"CT": 4, "split": 2, "ahead": 2}, {"CT": 1, "split": 1},
                                    {"CT": 1, "split": 2, "ahead": 2, "split_fast": True}])
def test_mma_adds_many_rows_into_float32(m, config):
    """accumulate=True at M > 1: each K split adds every row's float32 sums (and the bias, once a row) with
    atomics, across launches of 32 rows; a gate/up order places both halves of every row."""
    from lowbit.kernels.layout import place_channels

    w, _ = mma_weight(384, 64, 64, False, False, "gptq_v2", seed=5)
    x = torch.randn(m, 384).half().to(DEVICE)
    bias = torch.randn(64).half().to(DEVICE)
    start = torch.randn(m, 64, device=DEVICE)
    out = start.clone()
    assert qmatmul(x, w, bias, kernel="mma", config=config, accumulate=True, out=out) is out
    check(out - start, reference(x, w, bias))
    assert not w.locks.any()
    perm = torch.randperm(32).to(torch.int32).to(DEVICE)
    order = ChannelOrder(torch.argsort(perm).to(torch.int32), perm)
    out = torch.zeros(m, 64, device=DEVICE)
    qmatmul(x, w, kernel="mma", config=config, accumulate=True, out=out, order=order)
    check(out, torch.cat([place_channels(half, order) for half in reference(x, w).chunk(2, dim=-1)], dim=-1))


@pytest.mark.parametrize("config", [{"CT": 2, "split": 3, "ahead": 2, "lanes": True}, {"CT": 1, "split": 1},
                                    {"CT": 2, "split": 1, "x_steps": 2}, {"CT": 1, "split": 2, "x_steps": 4}])
def test_mma_adds_the_swiglu_of_gate_up_sums(config, monkeypatch):
    """swiglu_input with accumulate at M = 1: the kernel computes silu(gate) * up of float32 sums in float16 (as
    `silu_mul` rounds it) for its own rows first, then adds x @ W + bias into out."""
    from lowbit.kernels.reference import silu_mul_reference

    w, _ = mma_weight(384, 64, 128, False, False, "gptq", seed=4)
    x = (torch.randn(1, 768) * 2).to(DEVICE)
    bias = torch.randn(64).half().to(DEVICE)
    start = torch.randn(1, 64, device=DEVICE)
    out = start.clone()
    from lowbit.kernels import norm_rope

    monkeypatch.setattr(norm_rope, "silu_mul", None)  # no launch of its own
    qmatmul(x, w, bias, kernel="mma", config=config, swiglu_input=torch.float16, accumulate=True, out=out)
    check(out - start, reference(silu_mul_reference(x.half()), w, bias))
    with pytest.raises(ValueError, match="x_swiglu: one row of float32 gate/up sums"):
        mma.mma_matmul(x.half(), w, None, out, 4, add=True, x_swiglu=torch.float16)


@pytest.mark.parametrize("lanes", [False, True])
def test_mma_adds_gate_and_up_in_an_order(lanes):
    """accumulate with an order at M = 1: a fused w13's gate and up sums each land in the order an act-order
    down_proj reads them."""
    from lowbit.kernels.layout import place_channels

    w, _ = mma_weight(128, 64, 64, False, False, "gptq")
    x = torch.randn(1, 128).half().to(DEVICE)
    perm = torch.randperm(32).to(torch.int32).to(DEVICE)
    order = ChannelOrder(torch.argsort(perm).to(torch.int32), perm)
    out = torch.zeros(1, 64, device=DEVICE)
    qmatmul(x, w, kernel="mma", config={"CT": 2, "split": 2, "lanes": lanes}, accumulate=True, out=out,
            order=order)
    want = torch.cat([place_channels(half, order) for half in reference(x, w).chunk(2, dim=-1)], dim=-1)
    check(out, want)


def test_mma_reads_views_and_act_order_input():
    """x as a strided or misaligned view is copied; an act-order weight gathers x unless it arrives sorted."""
    w, _ = mma_weight(192, 48, 64, True, False, "gptq")
    base = torch.randn(2, 200).half().to(DEVICE)
    x = base[:, 1:193]  # 2-byte offset: not 16-byte aligned
    check(run(x, w, kernel="mma"), reference(x, w))
    xs = x.index_select(1, w.perm[:192].long())
    check(run(xs, w.for_sorted_input(), kernel="mma"), reference(x, w))


def test_mma_layout_refuses_what_it_cannot_hold(monkeypatch):
    codes = torch.randint(0, 16, (128, 32), dtype=torch.uint8)
    scales = torch.rand(4, 32).half()
    with pytest.raises(ValueError, match="groups shorter than 64 rows"):
        repack(codes, torch.full((4, 32), 8), scales, torch.arange(128) // 32, 4, layout="mma")
    with pytest.raises(ValueError, match="8-bit"):
        repack(codes, torch.full((1, 32), 8), scales[:1], torch.zeros(128, dtype=torch.int64), 8, layout="mma")
    with pytest.raises(ValueError, match="64-row slabs"):
        repack(codes[:96], torch.full((1, 32), 8), scales[:1], torch.zeros(96, dtype=torch.int64), 4, layout="mma")
    with pytest.raises(ValueError, match="unknown layout"):
        repack(codes, torch.full((1, 32), 8), scales[:1], torch.zeros(128, dtype=torch.int64), 4, layout="tiles")
    for zero in (-1, 64):  # the kernels read zero points as bytes, and 1024 + 16 * zero must stay exact in fp16
        zeros = torch.full((1, 32), 8)
        zeros[0, 5] = zero
        with pytest.raises(ValueError, match=f"a zero point of {zero}"):
            repack(codes, zeros, scales[:1], torch.zeros(128, dtype=torch.int64), 4, layout="mma")
        assert repack(codes, zeros, scales[:1], torch.zeros(128, dtype=torch.int64), 4).layout == "slots"
    w = repack(codes, torch.full((4, 32), 8), scales, torch.arange(128) // 32, 4)  # auto: falls back
    assert w.layout == "slots"
    one_group = (torch.full((1, 32), 8), scales[:1], torch.zeros(128, dtype=torch.int64))
    assert repack(codes, *one_group, 4).layout == "slots"  # auto: the mma kernels run on CUDA only
    w = repack(codes.to(DEVICE), *(t.to(DEVICE) for t in one_group), 4)
    assert w.layout == ("mma" if DEVICE == "cuda" else "slots")
    monkeypatch.setenv("LOWBIT_MMA", "0")
    assert repack(codes.to(DEVICE), *(t.to(DEVICE) for t in one_group), 4).layout == "slots"


def test_other_kernels_refuse_the_mma_layout():
    w, _ = mma_weight(128, 32)
    x = torch.randn(1, 128).half().to(DEVICE)
    with pytest.raises(ValueError, match="does not read the mma layout"):
        qmatmul(x, w, kernel="gemv")
    with pytest.raises(ValueError, match="does not read the mma layout"):  # also where the GEMV alone would run
        qmatmul(torch.randn(1, 256, device=DEVICE), w, kernel="gemv", swiglu_input=torch.float16)
    with pytest.raises(ValueError, match="mma_matmul needs"):
        qmatmul(x.float(), w, kernel="mma")
    check(qmatmul(x.float(), w), reference(x.float(), w))  # float32 x: the dequantize path


def test_mma_asm_operands():
    """The PTX step names every operand its constraints declare, and nothing beyond."""
    import re

    for tiles in (1, 2, 4):
        asm, constraints = mma.mma_asm(tiles)
        used = {int(v) for v in re.findall(r"\$(\d+)", asm)}
        assert max(used) < len(constraints.split(","))
        assert asm.count("mma.sync") == 4 * tiles


@pytest.mark.gpu
@pytest.mark.parametrize("k,n,act_order", [(4096, 12288, False), (11008, 4096, True), (4096, 22016, False)])
def test_mma_gpu_model_shapes(k, n, act_order):
    """LLaMA-7B's fused shapes through the default dispatch (the PTX itself, split K, the decode and small-batch
    sizes), each M on fresh inputs into a NaN-poisoned output; and gate/up's fused SwiGLU at M = 1."""
    from lowbit.kernels.reference import silu_mul_reference

    w, _ = mma_weight(k, n, 128, act_order, False, "gptq", seed=k + n)
    W = dequant_reference(w).double()
    for m in (1, 3, 8, 16, 17, 33, 64, 200):
        x = torch.randn(m, k, device=DEVICE).half()
        y = run(x, w)
        check(y, x.double() @ W)
        if m >= 16:  # the tile kernel, whether or not the dispatch picks it at this M
            check(run(x, w, kernel="dot", config={"BM": 64 if m > 32 else 16}), x.double() @ W)
    if n == 22016:
        x = torch.randn(1, k, device=DEVICE).half()
        y = qmatmul(x, w, swiglu=True)
        check(y, silu_mul_reference((x.double() @ W).half()).double())


@pytest.mark.parametrize("config,placed", [({"CT": 2, "split": 3}, False), ({"CT": 4, "split": 2, "ahead": 2,
                                                                           "lanes": True}, False),
                                           ({"CT": 2, "split": 3}, True), ({"CT": 2, "split": 2, "x_steps": 4}, True),
                                           ({"CT": 4, "split": 1, "x_steps": 2}, False)])
def test_mma_merges_attention_partials_as_it_loads(config, placed):
    """x_merge (one row): the kernel merges decode attention's split partials (head dim 64: a step's rows span
    two heads) into x for its own rows, then adds x @ W + bias into out; add_partials falls back to merging
    first in torch where the kernel does not take them. placed: the partials' acc in a column order (an
    act-order o_proj's), each row's m and l gathered from its head's."""
    from lowbit.kernels import qmatmul as qmatmul_module
    from lowbit.kernels.attention import decode_attention
    from lowbit.kernels.layout import ChannelOrder

    heads, dim, cached = 6, 64, 600
    q, k, v = torch.randn(1, 3 * heads, dim, device=DEVICE).split(heads, dim=1)
    kc, vc = torch.randn(1, heads, cached, dim, device=DEVICE), torch.randn(1, heads, cached, dim, device=DEVICE)
    idx = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    pos = torch.full((1,), 550, device=DEVICE)
    locks = torch.zeros(heads, dtype=torch.int32, device=DEVICE)
    order = None
    if placed:
        positions = torch.randperm(heads * dim, generator=torch.Generator().manual_seed(3)).to(torch.int32)
        order = ChannelOrder(positions.to(DEVICE), torch.argsort(positions).to(torch.int32).to(DEVICE))
    partials = decode_attention(q, k, v, kc, vc, idx, pos, locks, row_splits=3, merge=False, order=order)
    assert partials.splits > 1 and (partials.sources is not None) == placed
    x = partials.merge(torch.float16)
    w, _ = mma_weight(heads * dim, 64, 64, False, False, "gptq", seed=5)
    bias = torch.randn(64).half().to(DEVICE)
    start = torch.randn(1, 64, device=DEVICE)
    out = start.clone()
    mma.mma_matmul(None, w, bias, out, 4, add=True, x_merge=partials, **config)
    check(out - start, reference(x, w, bias))
    out2 = start.clone()
    assert qmatmul_module.add_partials(partials, w, bias, out2, config) is out2
    check(out2 - start, reference(x, w, bias))
    with pytest.raises(ValueError, match="x_merge"):
        mma.mma_matmul(x, w, None, out, 4, add=True, x_merge=partials)


def test_add_partials_without_the_fused_merge_merges_first(monkeypatch):
    from lowbit.kernels import qmatmul as qmatmul_module
    from lowbit.kernels.partials import AttentionPartials

    w, _ = mma_weight(128, 64, 64, False, False, "gptq", seed=6)
    ws = torch.randn(1 * 2 * 1 * (64 + 2), device=DEVICE)
    ws[1] = 0.5  # the second head's m
    partials = AttentionPartials(ws, rows=1, heads=2, head_dim=64, stride=64, splits=1)
    monkeypatch.setattr(qmatmul_module, "merges_partials", lambda w: False)
    launch = mma.mma_matmul

    def plain_x_only(*args, x_merge=None, **kwargs):
        assert x_merge is None, "merged in torch first, not by the kernel"
        return launch(*args, **kwargs)

    monkeypatch.setattr(mma, "mma_matmul", plain_x_only)
    out = torch.zeros(1, 64, device=DEVICE)
    ws[2:4] = ws[2:4].abs() + 1  # l > 0
    qmatmul_module.add_partials(partials, w, None, out, {"CT": 2})
    check(out, reference(partials.merge(torch.float16), w))
    for bad in (torch.zeros(1, 64, dtype=torch.float16, device=DEVICE), torch.zeros(1, 32, device=DEVICE)):
        with pytest.raises(ValueError, match="contiguous float32 out of 64 values"):
            qmatmul_module.add_partials(partials, w, None, bad)


INPUT_MODES_SM90 = """
import inspect
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lowbit.kernels import mma
kernel = mma._mma_kernel
params = list(inspect.signature(kernel.fn).parameters)
asm, constraints = mma._asm(1)
base = dict(CT=4, SPR=2, NT=1, ASM=asm, CONSTRAINTS=constraints, HAS_BIAS=False, SP=1, FENCE=True, SWIGLU=False,
            HAS_POS=False, STAGES=1, PREFETCH=0, EMULATE=False, ADD=2, AHEAD=2, XSW=0, XMG=0, XMG_DIM=0,
            XMG_STRIDE=0, XMG_N=0, XMG_PLACED=False, XSTEPS=1, SPLIT_FAST=False, PDL=True)
types = {"x_ptr": "*i32", "qw_ptr": "*i32", "s_ptr": "*i32", "z_ptr": "*i16", "b_ptr": "*fp16", "ws_ptr": "*fp32",
         "lock_ptr": "*i32", "y_ptr": "*fp32", "pos_ptr": "*i32", "xf_ptr": "*fp32", "xh_ptr": "*fp16",
         "src_ptr": "*i32"}
merge = {"XMG": 3, "XMG_DIM": 128, "XMG_STRIDE": 128, "XMG_N": 96}
for mode in ({"XSW": 1}, {"XSW": 1, "XSTEPS": 4}, merge, {**merge, "XMG_PLACED": True, "XSTEPS": 2}):
    const = {**base, **mode}
    signature = {p: "constexpr" if p in const else types.get(p, "i32") for p in params}
    source = ASTSource(kernel, signature, constexprs={(params.index(k),): v for k, v in const.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "launch_pdl": True})
    print(len(compiled.asm["cubin"]) > 0, compiled.asm["ptx"].count("mma.sync.aligned.m16n8k16"))
"""


X_FIRST_SM90 = """
import inspect
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lowbit.kernels import mma_dot
kernel = mma_dot._x_first_kernel
params = list(inspect.signature(kernel.fn).parameters)
types = {"x_ptr": "*fp16", "qw_ptr": "*i32", "s_ptr": "*i32", "z_ptr": "*i16", "b_ptr": "*fp16", "ws_ptr": "*fp32",
         "lock_ptr": "*i32", "y_ptr": "*fp16"}
for bm, ct, warps in ((64, 4, 4), (16, 8, 4)):
    const = dict(CT=ct, SPR=2, BM=bm, GROUP_M=8, HAS_BIAS=False, SP=4, FENCE=True, CH=2, PDL=True)
    signature = {p: "constexpr" if p in const else types.get(p, "i32") for p in params}
    source = ASTSource(kernel, signature, constexprs={(params.index(k),): v for k, v in const.items()})
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]
    print(bm, int("wgmma.mma_async" in ptx), int("mma.sync.aligned" in ptx))
"""


def test_x_first_builds_for_sm90(tmp_path):
    """`mma_dot(x_first=True)` builds for sm_90 through ptxas (the interpreter accepts what the compiler refuses):
    64 rows on wgmma, 16 rows on mma.sync."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-c", X_FIRST_SM90], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["64", "1", "0", "16", "0", "1"]


def test_input_modes_build_for_sm90(tmp_path):
    """The modes that compute x as they load it (SwiGLU of gate/up sums, XSW; attention's merge, XMG, also its
    placed partials) build for sm_90 through ptxas, with their mma in the loop: the interpreter runs no compiled
    path and accepts what the compiler refuses (a global that is not a constexpr, say)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-c", INPUT_MODES_SM90], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for line in done.stdout.splitlines():
        built, mmas = line.split()
        assert built == "True" and int(mmas) >= 4  # one step's four mma a word (the asm may appear more than once)
