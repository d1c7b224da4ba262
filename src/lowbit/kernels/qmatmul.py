"""`qmatmul`: y = x @ W for GPTQ weights in the kernels' layouts (`lowbit.kernels.layout`): which kernel runs
for how many rows of x, and decode's fusions around it.

The kernels live one to a module: the one-row GEMV (`lowbit.kernels.gemv`) and the split-K tensor-core kernel
(`lowbit.kernels.dot`) read the "slots" layout; the few-row tensor-core kernel (`lowbit.kernels.mma`) and the
tile kernel (`lowbit.kernels.mma_dot`, "dot" for that layout) read the "mma" layout; large M dequantizes to a
float weight for cuBLAS (`lowbit.kernels.dequant`). Tensors in, tensors out: reading checkpoints
(`lowbit.quant.pack`) and module wiring live elsewhere; the torch reference for every kernel is
`lowbit.kernels.reference`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.kernels import mma, mma_dot
from lowbit.kernels.dequant import dequant_matmul, dequantize  # noqa: F401  (dequantize: part of this API)
from lowbit.kernels.dot import dot
from lowbit.kernels.gemv import gemv
from lowbit.kernels.layout import ChannelOrder, QWeight, place_halves, repack  # noqa: F401
from lowbit.kernels.partials import AttentionPartials
from lowbit.kernels.splitk import sm_count
from lowbit.kernels.swiglu_load import ROUNDING

# The kernel and tile keywords for each M on CUDA: the first row whose bound is >= M. Measured on an H100
# with benchmarks/kernels.py (4-bit g128, one LLaMA-7B block; benchmarks/results/gpu.md); large M
# dequantizes to a float weight and calls cuBLAS. Off CUDA (the interpreter) "gemv" for M=1, else "dot".
CUDA_CONFIGS: list[tuple[int, str, dict]] = [
    # swiglu_once (read only by down_proj's launch, whose input is SwiGLU of the gate/up sums): 13.9 against 15.3 us
    # alone, 442 against 436 tok/s for the whole 7B model at batch 1 (2026-12-06, benchmarks/results/gpu.md)
    (1, "gemv", {"BN": 64, "num_warps": 4, "waves": 4, "unroll": 2, "swiglu_once": True}),
    # swap (the unpacked weight as wgmma's register operand): one 7B block at M=16 112.5 against 119.7 us, at M=64
    # 167.4 against 234.9 (H100, 2026-12-07, benchmarks/results/gpu.md)
    (16, "dot", {"BM": 16, "BN": 64, "num_warps": 4, "waves": 4, "swap": True}),
    (64, "dot", {"BM": 64, "BN": 128, "num_warps": 8, "waves": 2, "num_stages": 3, "swap": True}),
    (256, "dot", {"BM": 128, "BN": 128, "num_warps": 8}),  # 256: a 256-token prefill chunk needs no float copy
    (1 << 62, "dequant", {}),
]
# The same for weights in the "mma" layout (4-bit; `lowbit.kernels.mma`), which only its own kernels read.
MMA_CUDA_CONFIGS: list[tuple[int, str, dict]] = [
    # M=1 (adds into float32): words two steps ahead through registers beat the shared-memory pipeline by 15-35 %
    # a launch (H100, 2026-12-07, benchmarks/results/gemv_sweep_mma.md); the whole 7B model decodes at 508 tok/s
    # with this row against the slots GEMV's 447 (H100, 2026-12-07, benchmarks/results/gpu.md)
    (1, "mma", {"CT": 4, "waves": 8, "num_warps": 4, "stages": 1, "prefetch": 0, "ahead": 2, "lanes": True}),
    # a 7B block, H100, 2026-12-07: M=16 86.4 us (91.8 through the shared-memory pipeline), M=32 134.3; adding into
    # float32 (as the model runs them, `adds_itself`) M=16 78.2 against 87.6
    (16, "mma", {"CT": 4, "waves": 4, "num_warps": 4, "stages": 1, "prefetch": 0, "ahead": 2}),
    (32, "mma", {"CT": 4, "waves": 4, "num_warps": 4, "stages": 1, "prefetch": 0, "ahead": 3}),
    # the tile kernel (`mma_dot`): M=64 206.4 us against the mma kernel's 263.4 (the slots layout's tile kernel:
    # 166.7); whole 7B model at batch 64 5704 tok/s (slots 6607) (H100, 2026-12-07, benchmarks/results/gpu.md)
    (64, "dot", {"BM": 64, "CT": 8, "num_warps": 4, "num_stages": 3, "waves": 2}),
    (1 << 62, "dequant", {}),
]
HOST_GATHER_MIN_M = 2  # act-order: from this M on, permute x's columns once (torch) instead of in-kernel


KERNELS = ("gemv", "dot", "dequant", "mma")
LAYOUT_KERNELS = {"slots": ("gemv", "dot", "dequant"), "mma": ("mma", "dot", "dequant")}


def pick_kernel(m: int, device: torch.device, layout: str = "slots") -> tuple[str, dict]:
    """(kernel, launcher keywords) for M rows on `device` and a weight in `layout`."""
    if device.type != "cuda":
        return ("mma" if layout == "mma" else "gemv" if m == 1 else "dot"), {}
    table = MMA_CUDA_CONFIGS if layout == "mma" else CUDA_CONFIGS
    return next((kernel, config) for bound, kernel, config in table if m <= bound)


def adds_itself(m: int, w: QWeight) -> bool:
    """Whether `qmatmul(accumulate=True)` of M rows adds into its float32 out inside the kernel (atomics, no
    split-K finish, no result tensor), so that the model runs on a float32 residual (`Block.forward_into`): the
    GEMV (one row) and the mma kernel (any rows it takes, for an input in the weight's order). A 7B block of
    linears at 16 rows on an H100: 78.2 us adding, 87.6 with the split-K finish (2026-12-07)."""
    return pick_kernel(m, w.qweight.device, w.layout)[0] in ("gemv", "mma")


def merges_partials(w: QWeight) -> bool:
    """Whether `add_partials` merges one row's attention partials inside the kernel, as it loads x: the mma
    layout's kernel at one row, adding into float32 (not under deterministic algorithms), for a weight read in
    channel order. Decode attention then leaves its merge to it (`lowbit.kernels.partials`)."""
    return (w.layout == "mma" and w.perm is None and pick_kernel(1, w.qweight.device, w.layout)[0] == "mma"
            and not torch.are_deterministic_algorithms_enabled())


# o_proj merging decode attention's partials runs in fewer, longer programs than the M=1 row's 8 waves: its
# programs launch while attention's still hold the SMs, and at 8 waves some found no room and started late, then
# ended late (benchmarks/trace_step.py). 6 waves (a 7B layer: 704 programs of 3 steps, against 1024 of 2): the
# whole 7B decode step -2.7 %, 1814.9 against 1864.4-1866.7 us (H100, 2026-12-07, decode_sweep.py; 4 waves -0.3 %,
# 3 waves +0.7 %).
MERGE_WAVES = 6


def add_partials(p: AttentionPartials, w: QWeight, bias: Tensor | None, out: Tensor,
                 config: dict | None = None) -> Tensor:
    """out (float32 [1, N]) += attention @ W + bias, the attention (float16) merged from one row's unmerged
    partials: by the mma kernel as it loads x where `merges_partials`, else first, in torch. config: the mma
    kernel's keywords (default: its one-row row, with `MERGE_WAVES`)."""
    if out.dtype != torch.float32 or out.numel() != w.out_features or not out.is_contiguous():
        raise ValueError(f"add_partials adds into a contiguous float32 out of {w.out_features} values")
    if not merges_partials(w):
        x = p.merge(torch.float16).view(out.shape[:-1] + (-1,))
        return qmatmul(x, w, bias, out=out, accumulate=True)
    row = {**pick_kernel(1, w.qweight.device, w.layout)[1], "waves": MERGE_WAVES, **(config or {})}
    config = {k: v for k, v in row.items() if k != "host_gather"}
    mma.mma_matmul(None, w, bias, out.view(1, -1), sm_count(out.device), **config, add=True, x_merge=p)
    return out


def sorted_input_pays(m: int, device: torch.device, layout: str = "slots") -> bool:
    """Whether the kernel for M rows gains from x arriving in an act-order weight's `input_order`. The GEMV and
    tensor-core kernels read x in packed-row order; the large-M path dequantizes W into channel order for
    cuBLAS, so there placing x's channels would only cost its producer (an H100, M=1024: SiLU*up 24 -> 143 us,
    `benchmarks/small_ops.py`)."""
    return pick_kernel(m, device, layout)[0] != "dequant"


def qmatmul(x: Tensor, w: QWeight, bias: Tensor | None = None, kernel: str | None = None,
            config: dict | None = None, out: Tensor | None = None, swiglu: bool = False,
            order: ChannelOrder | None = None, accumulate: bool = False,
            swiglu_input: torch.dtype | None = None) -> Tensor:
    """x [..., K] fp16/bf16/fp32 -> x @ W + bias [..., N] in x's dtype (written into `out` if given).

    swiglu_input (a dtype): x [..., 2K] holds a fused w13's gate then up sums (typically float32, added up by
    `accumulate`) and the input is silu(gate) * up in that dtype, rounded as `silu_mul` rounds; the result
    comes in that dtype. The GEMV computes it as it loads x (no launch of its own); other kernels run
    `silu_mul` first.

    accumulate: out (float32, contiguous, the result's shape) += x @ W + bias instead. The GEMV and the mma
    kernel add each K split's float32 partial sums with atomics, so they need no split-K finish (the sum's order,
    and so its last bits, may vary between runs, unless `torch.use_deterministic_algorithms(True)`); the other
    kernels add their result in x's dtype.

    swiglu: W's columns are gate then up (a fused w13) and the result is SwiGLU's silu(gate) * up [..., N/2]:
    the GEMV computes it in its split-K finish (one launch less a layer in decode, nothing added to its loop);
    other kernels compute y first. order (swiglu only; the `input_order` of the next, act-order, linear): the
    activations come out in that order, so that linear reads them contiguously. With accumulate instead, the
    gate and up halves of out each get their columns in that order (for that linear's swiglu_input).
    `kernel` (one of KERNELS) and `config` (that launcher's tile keywords) override the dispatch by M;
    tests and benchmarks use them."""
    k, n = w.in_features, w.out_features
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; one of {KERNELS}")
    if kernel is not None and kernel not in LAYOUT_KERNELS[w.layout]:
        raise ValueError(f"the {kernel} kernel does not read the {w.layout} layout")
    if swiglu_input is not None:
        return _swiglu_input(x, w, bias, kernel, config, out, swiglu, order, accumulate, swiglu_input)
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {k}")
    if swiglu and n % 2:
        raise ValueError(f"swiglu needs gate and up columns of equal count, got {n} columns")
    if order is not None and (not (swiglu or accumulate) or order.positions.shape != (n // 2,)):
        raise ValueError(f"an order goes with swiglu or accumulate and places {n // 2} outputs")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if kernel is None:
        kernel, picked = pick_kernel(m, x.device, w.layout)
        if kernel in ("mma", "dot") and w.layout == "mma" and x.dtype != torch.float16:  # fp16 codes/PTX
            kernel, picked = "dequant", {}
        config = {**picked, **(config or {})}
    if kernel == "gemv" and m > 1:
        raise ValueError("the gemv kernel takes one row")
    if accumulate:
        return _accumulate(x, x2, w, bias, kernel, config, out, swiglu, order)
    fused = kernel == "gemv" or (kernel == "mma" and m == 1)
    if swiglu and not fused:
        from lowbit.kernels.norm_rope import silu_mul

        act = silu_mul(qmatmul(x2, w, bias, kernel, config), None if order is None else order.sources)
        act = act if out is None else out.view(m, n // 2).copy_(act)
        return act.view(*lead, n // 2)
    if swiglu:
        config, n = {**(config or {}), "swiglu": True, "positions": None if order is None else order.positions}, n // 2
    y = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out.view(m, n)
    if m == 0:
        return y.view(*lead, n)
    config = dict(config or {})
    gather = config.pop("host_gather", m >= HOST_GATHER_MIN_M)
    if kernel == "dequant":
        dequant_matmul(x2, w, bias, y, **config)
        return y.view(*lead, n)
    # coalesced x tiles beat a gather (the mma layout's kernels read no perm)
    if (gather or w.layout == "mma") and w.tail_perm and w.perm is not None and kernel != "gemv":
        x2 = x2.index_select(1, w.perm[:k].long())
        w = w.for_sorted_input()
    elif x2.stride(1) != 1:
        x2 = x2.contiguous()
    if kernel == "mma":
        if not mma.supports(x2, w):  # a view (strided, or not 16-byte aligned): a fresh copy is both
            x2 = x2.clone(memory_format=torch.contiguous_format)
        mma.mma_matmul(x2, w, bias, y, sm_count(x2.device), **config)
        return y.view(*lead, n)
    if kernel == "dot" and w.layout == "mma":
        mma_dot.mma_dot(x2, w, bias, y, **config)
        return y.view(*lead, n)
    launch = {"gemv": gemv, "dot": dot}[kernel]
    launch(x2, w, bias, y, **config)
    return y.view(*lead, n)


def _accumulate(x: Tensor, x2: Tensor, w: QWeight, bias: Tensor | None, kernel: str, config: dict | None,
                out: Tensor | None, swiglu: bool, order: ChannelOrder | None = None,
                x_swiglu: torch.dtype | None = None) -> Tensor:
    """qmatmul's accumulate=True: out += x @ W + bias (x_swiglu: qmatmul's swiglu_input);
    order: out's gate and up halves each get their columns in this order (what the next act-order linear
    reads with swiglu_input)."""
    shape = (*x.shape[:-1], w.out_features)
    if swiglu or out is None or out.dtype != torch.float32 or tuple(out.shape) != shape or not out.is_contiguous():
        raise ValueError(f"accumulate adds x @ W to `out`: a contiguous float32 tensor of shape {shape} "
                         "(not with swiglu)")
    if not out.numel():
        return out
    if torch.are_deterministic_algorithms_enabled() or not (kernel == "gemv" or _mma_adds(x2, w, kernel, x_swiglu)):
        return out.add_(place_halves(qmatmul(x, w, bias, kernel, config, swiglu_input=x_swiglu), order))
    config = {k: v for k, v in (config or {}).items() if k != "host_gather"}
    positions = None if order is None else order.positions
    if kernel == "mma":
        mma.mma_matmul(x2.contiguous(), w, bias, out.view(x2.shape[0], -1), sm_count(x2.device), **config, add=True,
                       x_swiglu=x_swiglu, positions=positions)
    else:
        gemv(x2.contiguous(), w, bias, out.view(1, -1), **config, add=True, positions=positions, x_swiglu=x_swiglu)
    return out


def _mma_adds(x2: Tensor, w: QWeight, kernel: str, x_swiglu) -> bool:
    """Whether the mma kernel adds these rows into float32 itself (else: a result, then torch's add); with
    x_swiglu (one row, float16 only: it multiplies float16), computing the input from float32 gate/up sums as it
    loads."""
    if kernel != "mma" or w.layout != "mma" or w.perm is not None:
        return False
    if x_swiglu is not None:
        return x2.shape[0] == 1 and x_swiglu == torch.float16 and x2.dtype == torch.float32
    return mma.supports(x2, w)


def _swiglu_input(x: Tensor, w: QWeight, bias: Tensor | None, kernel: str | None, config: dict | None,
                  out: Tensor | None, swiglu: bool, order: ChannelOrder | None, accumulate: bool,
                  dtype: torch.dtype) -> Tensor:
    """qmatmul with swiglu_input=dtype: x [..., 2K] is gate then up, the input silu(gate) * up in `dtype`. The
    GEMV computes the input as it loads x, other kernels get it from `silu_mul`'s launch first."""
    width = 2 * w.in_features
    if x.shape[-1] != width or dtype not in ROUNDING or dtype is None:
        raise ValueError(f"swiglu_input: x holds gate then up ({width} features, got {x.shape[-1]}) and the input "
                         f"is a float dtype (got {dtype})")
    m = x[..., 0].numel()
    picked = pick_kernel(m, x.device, w.layout)
    chosen, x2 = kernel or picked[0], x.reshape(-1, width)
    merged = {**(picked[1] if kernel is None else {}), **(config or {})}
    if accumulate and not swiglu and _mma_adds(x2, w, chosen, dtype):
        return _accumulate(x, x2, w, bias, "mma", merged, out, False, order, dtype)
    if chosen != "gemv" or swiglu or (order is not None and not accumulate):
        from lowbit.kernels import norm_rope

        return qmatmul(norm_rope.silu_mul(x, dtype=dtype), w, bias, kernel, config, out, swiglu, order, accumulate)
    config = merged
    if accumulate:
        return _accumulate(x, x2, w, bias, "gemv", config, out, False, order, dtype)
    config.pop("host_gather", None)
    y = torch.empty(m, w.out_features, dtype=dtype, device=x.device) if out is None else out.view(m, -1)
    if m:
        gemv(x2.contiguous(), w, bias, y, **config, x_swiglu=dtype)
    return y.view(*x.shape[:-1], w.out_features)
