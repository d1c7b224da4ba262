"""lowbit.kernels.qmatmul against lowbit.kernels.reference, and the reference against lowbit.quant.pack.

Weights go through the on-disk format first (pack.pack -> pack.unpack -> repack), so every bit width,
group size, act-order, sym/asym and v1/v2 zero convention reaches the kernels as a checkpoint would.
Kernels run on CPU through Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported) and
on CUDA when present; outputs are poisoned with NaN before each run.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from lowbit.kernels.layout import place_channels
from lowbit.kernels.qmatmul import ChannelOrder, dequantize, qmatmul, repack
from lowbit.kernels.reference import dequant_reference, qmatmul_reference
from lowbit.quant import pack
from tests.kernels.common import DEVICE


def make_weight(k: int, n: int, bits: int, group_size: int, act_order: bool, sym: bool, fmt: str, seed: int = 0,
                layout: str = "slots"):
    """Random GPTQ layer -> (QWeight on DEVICE in `layout`, on-disk tensors). The slots layout by default: this
    file tests its kernels (the mma layout's are in test_mma.py), and on CUDA "auto" would take mma."""
    g = torch.Generator().manual_seed(seed)
    groups = pack.num_groups(k, group_size)
    codes = torch.randint(0, 1 << bits, (k, n), generator=g).to(torch.uint8)
    lo, hi = (1, 1 << bits) if fmt == "gptq" else (0, (1 << bits) - 1)
    if sym:
        zeros = torch.full((groups, n), 1 << (bits - 1), dtype=torch.int32)
    else:
        zeros = torch.randint(lo, hi + 1, (groups, n), generator=g, dtype=torch.int32)
    scales = (torch.rand(groups, n, generator=g) * 0.02 + 0.002).half()
    g_idx = pack.default_g_idx(k, group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    disk = pack.pack(codes, zeros, scales, g_idx, bits, fmt)
    c, z, s, gi = pack.unpack(disk, bits, fmt)
    return repack(c.to(DEVICE), z.to(DEVICE), s.to(DEVICE), gi.to(DEVICE), bits, layout=layout), disk


def check(y: torch.Tensor, ref: torch.Tensor) -> None:
    """y against a float64 reference, at the precision of y's dtype (relative to the output's scale)."""
    tol = {torch.float16: 4e-3, torch.bfloat16: 2e-2, torch.float32: 2e-5}[y.dtype]
    assert not y.isnan().any(), "unwritten (NaN-poisoned) outputs"
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))


def run(x, w, bias=None, **kw):
    out = torch.full((*x.shape[:-1], w.out_features), float("nan"), dtype=x.dtype, device=x.device)
    y = qmatmul(x, w, bias, out=out, **kw)
    assert y.data_ptr() == out.data_ptr()
    assert not w.locks.any(), "split-K counters must be left at zero"
    return y


def reference(x, w, bias=None):
    y = x.double() @ dequant_reference(w).double()
    return y if bias is None else y + bias.double()


# ------------------------------------------------------------------------------- layout (torch only)

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("sym,fmt", [(True, "gptq"), (False, "gptq"), (False, "gptq_v2")])
def test_layout_reference_is_gptq_dequant(bits, group_size, act_order, sym, fmt):
    k, n = (576 if group_size != 32 else 96), 40
    w, disk = make_weight(k, n, bits, group_size, act_order, sym, fmt)
    expected = pack.dequantize(disk, bits, fmt, dtype=torch.float32).t()
    torch.testing.assert_close(dequant_reference(w).cpu(), expected, rtol=0, atol=0)
    assert w.padded_rows % (16 * (16 if bits == 3 else 32 // bits)) == 0


def test_irregular_groups_are_padded():
    """Act-order groups of unequal sizes (not multiples of 16) still give the GPTQ weight."""
    k, n, bits = 100, 24, 4
    g_idx = torch.tensor([0] * 37 + [1] * 20 + [2] * 43)[torch.randperm(k)]
    codes = torch.randint(0, 16, (k, n), dtype=torch.uint8)
    zeros = torch.randint(0, 16, (3, n), dtype=torch.int32)
    scales = torch.rand(3, n).half() + 0.01
    w = repack(codes, zeros, scales, g_idx, bits)
    expected = (codes.float() - zeros.float()[g_idx.long()]) * scales.float()[g_idx.long()]
    torch.testing.assert_close(dequant_reference(w), expected, rtol=0, atol=0)
    assert w.perm is not None and not w.tail_perm and w.group_slots == 1
    x = torch.randn(1, k).half()
    check(run(x.to(DEVICE), w.to(DEVICE), kernel="gemv").cpu(), reference(x, w))


# --------------------------------------------------------------------------------- kernels

WEIGHTS = [  # bits, K, N, group_size, act_order, sym, fmt
    (4, 576, 192, 128, False, False, "gptq"),  # partial last group, N not a multiple of the tile
    (4, 256, 128, 64, False, True, "gptq"),  # whole blocks and column pairs: the unmasked GEMV
    (4, 576, 192, 128, True, True, "gptq"),
    (4, 96, 200, 32, True, False, "gptq_v2"),
    (4, 4096, 136, 128, True, False, "gptq"),
    (8, 576, 72, 64, False, False, "gptq_v2"),
    (8, 320, 48, -1, True, True, "gptq"),
    (3, 576, 40, 128, True, False, "gptq"),
    (3, 288, 72, 32, False, True, "gptq_v2"),
    (2, 576, 56, 64, True, False, "gptq_v2"),
    (2, 96, 40, -1, False, False, "gptq"),
]
CALLS = [  # kernel, M, config
    ("gemv", 1, None),
    ("gemv", 1, {"BN": 16, "split": 2}),
    ("gemv", 1, {"BN": 16, "split": 3, "unroll": 2}),
    ("gemv", 1, {"BN": 16, "split": 3, "prefetch": True}),  # loads a step ahead (odd and even blocks a split)
    ("gemv", 1, {"BN": 16, "split": 2, "unroll": 2, "prefetch": True}),
    ("dot", 1, None),
    ("dot", 3, {"split": 3}),
    ("dot", 16, None),
    ("dot", 17, {"host_gather": False, "per_slot": False}),
    ("dot", 127, {"BM": 64, "BN": 64}),
    ("dequant", 5, {"workspace": 1}),  # column slices of 128 (the prefill path)
]


@pytest.mark.parametrize("bits,k,n,group_size,act_order,sym,fmt", WEIGHTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_qmatmul(bits, k, n, group_size, act_order, sym, fmt, dtype):
    w, _ = make_weight(k, n, bits, group_size, act_order, sym, fmt)
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(n, generator=g).half().to(DEVICE) if sym else None
    for kernel, m, config in CALLS:
        x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
        y = run(x, w, bias, kernel=kernel, config=config)
        check(y, reference(x, w, bias))


SWAP_CALLS = [  # the weight as the dot's first operand
    (1, {"swap": True}, torch.float16),
    (17, {"swap": True, "per_slot": False, "host_gather": False}, torch.float16),
    (40, {"swap": True, "BM": 64, "BN": 64, "split": 2}, torch.float16),
    (33, {"swap": True, "per_slot": True, "denorm": False, "BM": 64}, torch.float16),  # (q - z) * s in float16
    (5, {"swap": True, "per_slot": True}, torch.float32),
]


@pytest.mark.parametrize("bits,k,n,group_size,act_order,sym,fmt", WEIGHTS)
def test_dot_with_the_weight_first(bits, k, n, group_size, act_order, sym, fmt):
    w, _ = make_weight(k, n, bits, group_size, act_order, sym, fmt)
    g = torch.Generator().manual_seed(2)
    bias = torch.randn(n, generator=g).half().to(DEVICE) if sym else None
    for m, config, dtype in SWAP_CALLS:
        x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
        check(run(x, w, bias, kernel="dot", config=config), reference(x, w, bias))


def test_dot_with_the_weight_first_needs_float16_x_or_per_slot():
    w, _ = make_weight(256, 64, 4, 128, False, False, "gptq")
    with pytest.raises(ValueError, match="swap with other than float16 x"):
        run(torch.randn(2, 256).to(DEVICE), w, kernel="dot", config={"swap": True})


def test_leading_dims_and_reference():
    w, _ = make_weight(576, 192, 4, 128, True, False, "gptq")
    x = torch.randn(2, 3, 576).half().to(DEVICE)
    y = run(x, w)
    assert y.shape == (2, 3, 192)
    check(y, reference(x, w))
    torch.testing.assert_close(qmatmul_reference(x, w).double(), reference(x, w), rtol=4e-3, atol=4e-3)


@pytest.mark.parametrize("bits,k,n,group_size,act_order", [(4, 576, 192, 128, True), (3, 288, 72, 32, False),
                                                           (8, 320, 48, -1, True)])
def test_dequantize_kernel(bits, k, n, group_size, act_order):
    w, _ = make_weight(k, n, bits, group_size, act_order, False, "gptq_v2")
    torch.testing.assert_close(dequantize(w, torch.float32), dequant_reference(w), rtol=0, atol=0)
    x = torch.randn(5, k).half().to(DEVICE)
    check(run(x, w, kernel="dequant"), reference(x, w))


def test_split_k_is_deterministic():
    w, _ = make_weight(4096, 136, 4, 128, False, False, "gptq")
    x = torch.randn(1, 4096).half().to(DEVICE)
    a = run(x, w, kernel="dot", config={"split": 4})
    b = run(x, w, kernel="dot", config={"split": 4})
    assert torch.equal(a, b)


@pytest.mark.parametrize("n,act_order,kernel,config", [(256, False, "gemv", None), (200, True, "gemv", None),
                                                       (200, True, "gemv", {"BN": 16, "split": 3}),
                                                       (200, False, "dot", None)])
def test_swiglu_output(n, act_order, kernel, config):
    """swiglu=True: the columns are gate then up and the result is silu(gate) * up, computed by the GEMV in its
    split-K finish (whole and ragged column tiles, act-order) and after the product by the other kernels."""
    from lowbit.kernels.reference import silu_mul_reference

    w, _ = make_weight(192, n, 4, 64, act_order, False, "gptq", seed=n)
    x = torch.randn(1, 192).half().to(DEVICE)
    out = torch.full((1, n // 2), float("nan"), dtype=torch.float16, device=DEVICE)
    got = qmatmul(x, w, kernel=kernel, config=config, swiglu=True, out=out)
    assert got.data_ptr() == out.data_ptr() and not w.locks.any()
    want = silu_mul_reference(run(x, w, kernel=kernel).cpu()).to(DEVICE)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))


@pytest.mark.parametrize("kernel,config", [("gemv", None), ("gemv", {"BN": 16, "split": 3}),
                                           ("gemv", {"BN": 16, "split": 3, "unroll": 2, "prefetch": True}),
                                           ("dot", None)])
def test_accumulate_adds_to_a_float32_out(kernel, config):
    """accumulate=True: out (float32) += x @ W + bias; the GEMV adds each K split's float32 partial sums
    (atomics, no split-K finish), the other kernels their fp16 result."""
    w, _ = make_weight(576, 192, 4, 128, True, False, "gptq", seed=5)
    x = torch.randn(1, 576).half().to(DEVICE)
    bias = torch.randn(192).half().to(DEVICE)
    start = torch.randn(1, 192, device=DEVICE)
    out = start.clone()
    assert qmatmul(x, w, bias, kernel=kernel, config=config, accumulate=True, out=out) is out
    added = out - start
    check(added if kernel == "gemv" else added.half(), reference(x, w, bias))
    assert not w.locks.any()
    for wrong in (None, out.half(), out[:, :96], torch.zeros(2, 96, device=DEVICE).t()):
        with pytest.raises(ValueError, match="contiguous float32"):
            qmatmul(x, w, kernel=kernel, accumulate=True, out=wrong)


@pytest.mark.parametrize("kernel,m,act_order,config", [
    ("gemv", 1, False, None), ("gemv", 1, True, None), ("dot", 3, True, None),
    ("gemv", 1, False, {"BN": 16, "split": 2, "unroll": 2, "swiglu_once": True}),  # odd blocks a split
    ("gemv", 1, True, {"BN": 16, "split": 3, "swiglu_once": True, "prefetch": True})])
def test_swiglu_input_is_silu_mul_then_the_matmul(kernel, m, act_order, config):
    """swiglu_input: x holds a fused w13's float32 gate and up sums; the input is silu(gate) * up rounded to
    float16 as `silu_mul` rounds (the GEMV computes it as it loads x, or with swiglu_once into a scratch row
    first), alone or added into a float32 out."""
    from lowbit.kernels.reference import silu_mul_reference

    k = 320
    w, _ = make_weight(k, 192, 4, 64, act_order, False, "gptq", seed=9)
    bias = torch.randn(192).half().to(DEVICE)
    x = (torch.randn(m, 2 * k) * 2).to(DEVICE)
    want = reference(silu_mul_reference(x.half()), w, bias)
    y = qmatmul(x, w, bias, kernel=kernel, config=config, swiglu_input=torch.float16)
    assert y.dtype == torch.float16 and y.shape == (m, 192)
    check(y, want)
    start = torch.randn(m, 192, device=DEVICE)
    out = start.clone()
    qmatmul(x, w, bias, kernel=kernel, config=config, swiglu_input=torch.float16, accumulate=True, out=out)
    check(out - start if kernel == "gemv" else (out - start).half(), want)
    assert not w.locks.any()
    with pytest.raises(ValueError, match="gate then up"):
        qmatmul(x[:, :k], w, swiglu_input=torch.float16)


@pytest.mark.parametrize("kernel,m", [("gemv", 1), ("dot", 2)])
def test_accumulate_places_gate_and_up_for_an_act_order_down_proj(kernel, m):
    """accumulate with an order: a fused w13's gate and up sums each land in the order an act-order w2 reads
    (its `input_order`), and w2's sorted-input weight then reads them with swiglu_input: the same as w2 on the
    unplaced sums."""
    from lowbit.kernels.reference import silu_mul_reference

    k, i = 256, 320
    w13, _ = make_weight(k, 2 * i, 4, 64, False, False, "gptq", seed=3)
    w2, _ = make_weight(i, 64, 4, 64, True, False, "gptq", seed=4)
    order = w2.input_order
    x = torch.randn(m, k).half().to(DEVICE)
    sums = reference(x, w13)
    out = torch.zeros(m, 2 * i, device=DEVICE)
    qmatmul(x, w13, kernel=kernel, accumulate=True, out=out, order=order)
    placed = torch.cat([place_channels(half, order) for half in sums.chunk(2, dim=-1)], dim=-1)
    check(out if kernel == "gemv" else out.half(), placed)
    got = qmatmul(out, w2.for_sorted_input(), kernel=kernel, swiglu_input=torch.float16)
    check(got, reference(silu_mul_reference(out_unplaced(out, order).half()), w2))
    assert not w13.locks.any() and not w2.locks.any()


def out_unplaced(out, order):
    """The inverse of placing each half in `order`."""
    return torch.cat([half.index_select(-1, order.positions.long()) for half in out.chunk(2, dim=-1)], dim=-1)


def test_swiglu_needs_gate_and_up_halves():
    w, _ = make_weight(64, 33, 4, 64, False, False, "gptq")
    with pytest.raises(ValueError, match="equal count"):
        qmatmul(torch.randn(1, 64).half().to(DEVICE), w, swiglu=True)


# ------------------------------------------------------------------- act-order input written pre-sorted

@pytest.mark.parametrize("bits,k,group_size", [(4, 320, 64), (3, 200, 32), (8, 96, 32)])
def test_sorted_input_is_the_gather_without_it(bits, k, group_size):
    """x in `input_order` and the sorted-input view give the gathering kernels' result, bit for bit (the same
    products summed in the same order): what RMSNorm/SwiGLU/attention writing x pre-sorted relies on."""
    w, _ = make_weight(k, 48, bits, group_size, True, False, "gptq", seed=k)
    order = w.input_order
    assert w.tail_perm and order is not None
    assert order.positions.dtype == order.sources.dtype == torch.int32
    assert torch.equal(order.sources.long().cpu(), w.perm[:k].long().cpu())
    assert torch.equal(order.sources[order.positions.long()].long().cpu(), torch.arange(k)), "inverses"
    sorted_w = w.for_sorted_input()
    assert sorted_w.perm is None and sorted_w.input_order is None
    g = torch.Generator().manual_seed(2)
    for kernel, m, config in CALLS:
        x = torch.randn(m, k, generator=g).half().to(DEVICE)
        want = run(x, w, kernel=kernel, config=config)
        got = run(place_channels(x, order), sorted_w, kernel=kernel, config=config)
        if kernel == "dequant":  # cuBLAS may sum the reordered K in another order
            check(got, want.double())
        else:
            assert torch.equal(got, want), (kernel, m, config)


def test_sorted_input_needs_an_input_order():
    w, _ = make_weight(64, 32, 4, 32, False, False, "gptq")
    assert w.input_order is None
    with pytest.raises(ValueError, match="no input_order"):
        w.for_sorted_input()
    irregular, _ = make_weight(96, 32, 4, 24, True, False, "gptq")  # groups padded inside: no tail_perm
    assert not irregular.tail_perm and irregular.input_order is None


@pytest.mark.parametrize("kernel", ["gemv", "dot"])
def test_swiglu_comes_out_in_the_next_linears_order(kernel):
    """order: the activations come out in the next (act-order) linear's input order: the GEMV's finish
    scatters through positions, the other kernels' SiLU*up gathers through sources."""
    w, _ = make_weight(192, 160, 4, 64, False, False, "gptq", seed=3)
    positions = torch.randperm(80, generator=torch.Generator().manual_seed(4)).to(torch.int32).to(DEVICE)
    order = ChannelOrder(positions, torch.argsort(positions).to(torch.int32))
    x = torch.randn(1, 192).half().to(DEVICE)
    plain = qmatmul(x, w, kernel=kernel, swiglu=True)
    out = torch.full((1, 80), float("nan"), dtype=torch.float16, device=DEVICE)
    got = qmatmul(x, w, kernel=kernel, swiglu=True, order=order, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got, place_channels(plain, order))
    with pytest.raises(ValueError, match="an order goes with swiglu"):
        qmatmul(x, w, kernel=kernel, order=order)
    with pytest.raises(ValueError, match="an order goes with swiglu"):
        half = ChannelOrder(positions[:40], positions[:40])
        qmatmul(x, w, kernel=kernel, swiglu=True, order=half)


# ----------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 16, 64, 2048])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_qmatmul_gpu_large(bits, m, dtype):
    w, _ = make_weight(4096, 1000, bits, 128, True, False, "gptq")
    x = torch.randn(m, 4096, device="cuda").to(dtype)
    for kernel in ("gemv", "dot", "dequant") if m == 1 else ("dot", "dequant"):
        check(run(x, w, kernel=kernel), reference(x, w))


AWKWARD_M = (1, 3, 16, 17, 127, 2048)
AWKWARD_WEIGHTS = [(4, 128, False), (4, 128, True), (2, 128, True), (3, 128, True), (8, 128, True),
                   (4, 32, True), (3, 64, False), (2, -1, False)]


@pytest.mark.gpu
@pytest.mark.parametrize("bits,group_size,act_order", AWKWARD_WEIGHTS)
def test_qmatmul_gpu_awkward_shapes(bits, group_size, act_order):
    """The default dispatch (what the model runs) at every awkward M, K = 4000 (not a multiple of any block
    or group), N = 1000 (not a multiple of any tile): fresh inputs, NaN-poisoned outputs, bias on. (Every
    bits x group x act-order x sym x format combination runs through each kernel in test_qmatmul, on the
    interpreter in CI and on the GPU here; this adds the GPU's compiled tile shapes at real sizes.)"""
    w, _ = make_weight(4000, 1000, bits, group_size, act_order, False, "gptq", seed=bits * abs(group_size))
    bias = torch.randn(1000, device="cuda").half()
    ms = AWKWARD_M if (bits, group_size) == (4, 128) else (1, 17, 127, 2048)
    for m in ms:
        x = torch.randn(m, 4000, device="cuda").half()
        check(run(x, w, bias), reference(x, w, bias))


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", ["1", "0"])
def test_dependent_launches_in_a_graph(pdl, monkeypatch):
    """A chain of launches, each reading the one before's output, replayed as a CUDA graph: with programmatic
    dependent launch a kernel starts before its predecessor ends, so a missing wait would read stale x."""
    from lowbit.kernels import norm_rope

    monkeypatch.setenv("LOWBIT_PDL", pdl)
    w1, _ = make_weight(4096, 4096, 4, 128, False, False, "gptq", seed=1)
    w2, _ = make_weight(4096, 4096, 4, 128, True, False, "gptq", seed=2)
    norm = torch.rand(4096, device="cuda").half() + 0.5
    x = torch.zeros(1, 4096, device="cuda").half()

    def chain():
        h = x
        for _ in range(4):  # gemv -> norm -> dot (M=1 forced) -> norm: every kernel kind of the decode step
            h = norm_rope.rms_norm(qmatmul(h, w1), norm, 1e-6)
            h = norm_rope.rms_norm(qmatmul(h, w2, kernel="dot"), norm, 1e-6)
        return h

    chain()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain()
    for seed in range(3):  # fresh input each replay: stale reads would give the previous replay's answer
        x.copy_(torch.randn(1, 4096, generator=torch.Generator().manual_seed(seed)).half())
        graph.replay()
        h = x.double()
        for _ in range(4):
            for w in (w1, w2):
                h = h @ dequant_reference(w).double()
                h = (h.half().double() * torch.rsqrt(h.half().double().pow(2).mean(-1, keepdim=True) + 1e-6)
                     ).half().double() * norm.double()
        torch.testing.assert_close(out.double(), h, rtol=3e-2, atol=3e-2 * float(h.abs().max()))


def test_zero_points_take_one_byte_unless_they_cannot():
    """uint8 zero points halve their memory (0.1 GB on a 13B model); a file with zeros outside 0..255 keeps fp16."""
    codes = torch.randint(0, 16, (256, 32), dtype=torch.uint8)
    scales = torch.rand(2, 32).half()
    g_idx = torch.arange(256) // 128
    assert repack(codes, torch.full((2, 32), 8), scales, g_idx, 4).zeros.dtype == torch.uint8
    w = repack(codes, torch.full((2, 32), 256), scales, g_idx, 4)
    assert w.zeros.dtype == torch.float16 and w.zeros.max() == 256


@pytest.mark.parametrize("bits", [3, 4])
def test_repack_in_column_slices_equals_at_once(bits, monkeypatch):
    """Repack packs ~64 MB of columns at a time (a 13B load would otherwise hold a 1 GB int64 copy)."""
    import lowbit.kernels.layout as layout

    w_once, _ = make_weight(256, 200, bits, 64, True, False, "gptq")
    monkeypatch.setattr(layout, "REPACK_ELEMENTS", 1)  # slices of 64 columns
    w_sliced, _ = make_weight(256, 200, bits, 64, True, False, "gptq")
    for a, b in ((w_once.qweight, w_sliced.qweight), (w_once.qhigh, w_sliced.qhigh), (w_once.perm, w_sliced.perm)):
        assert (a is None and b is None) or torch.equal(a, b)


def test_sorted_input_pays_except_on_the_dequantize_path():
    """Producers place x's channels only for kernels that read x in packed order: on CUDA the large-M path
    dequantizes W into channel order for cuBLAS, so there the linear takes x as it is."""
    from lowbit.kernels.qmatmul import sorted_input_pays

    cuda = torch.device("cuda")
    assert sorted_input_pays(1, cuda) and sorted_input_pays(16, cuda) and sorted_input_pays(256, cuda)
    assert not sorted_input_pays(257, cuda) and not sorted_input_pays(4096, cuda)
    assert sorted_input_pays(4096, torch.device("cpu"))  # the interpreter runs the dot kernel at any M
