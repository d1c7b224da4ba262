"""The end of a split-K program: write a tile, or add it to its siblings' and let the last one write the sum.

Shared by every GEMM-like kernel (`lowbit.kernels.gemv`, `lowbit.kernels.dot`, `lowbit.kernels.mma`): partial
sums go to a float32 workspace, a per-tile counter says which program arrives last, and that one sums the
partials in split order (so results do not depend on timing) and writes y, optionally as SwiGLU's
silu(gate) * up. Also how many programs fill the GPU (`sm_count`, `split_k`) and which tile a program takes
(`grouped_tile`).
"""

import functools

import torch
import triton
import triton.language as tl

from lowbit.kernels.sync import fence_gpu


@triton.jit
def _halves(t):
    """[1, 2B] -> its two [B] halves."""
    B: tl.constexpr = t.shape[1] // 2
    return tl.split(tl.permute(tl.reshape(t, (2, B)), (1, 0)))


@triton.jit
def _store(y_ptr, mn, mask, total, SWIGLU: tl.constexpr, pos_ptr, HAS_POS: tl.constexpr):
    """y[mn] = total; SWIGLU: total [1, 2B] is gate columns then their up columns, and y gets silu(gate) * up at
    the gate columns (HAS_POS, one row: at pos[column], the next linear's act-order positions), rounded where
    torch's silu-then-mul rounds (gate/up, silu, product)."""
    dt: tl.constexpr = y_ptr.dtype.element_ty
    if SWIGLU:
        g, u = _halves(total)
        mn_g, _ = _halves(mn)
        ok_g, _ = _halves(mask)
        if HAS_POS:
            mn_g = tl.load(pos_ptr + mn_g, mask=ok_g, other=0)
        gf = g.to(dt).to(tl.float32)
        act = (gf / (1.0 + tl.exp(-gf))).to(dt).to(tl.float32)
        tl.store(y_ptr + mn_g, (act * u.to(dt).to(tl.float32)).to(dt), mask=ok_g)
    else:
        tl.store(y_ptr + mn, total.to(dt), mask=mask)


@triton.jit
def finish_tile(out, offs_m, offs_n, n_ok, M, N, b_ptr, ws_ptr, lock_ptr, y_ptr, lock_id, pid_k, split,
            HAS_BIAS: tl.constexpr, SP: tl.constexpr, FENCE: tl.constexpr, SWIGLU: tl.constexpr, pos_ptr,
            HAS_POS: tl.constexpr):
    """Write the [BM, BN] fp32 tile `out` (+ bias) of columns offs_n (n_ok: which exist) to y (see `_store`);
    with split > 1 (SP = its next power of two, so few compiled variants) the last of the K-splits to arrive
    sums all partials (fixed order, so results are deterministic) with their loads issued together, and resets
    the tile's counter."""
    mask = (offs_m[:, None] < M) & n_ok[None, :]
    mn = offs_m[:, None] * N + offs_n[None, :]
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    else:
        bias = tl.zeros((1, out.shape[1]), tl.float32)
    if SP == 1:
        _store(y_ptr, mn, mask, out + bias, SWIGLU, pos_ptr, HAS_POS)
    else:
        tl.store(ws_ptr + pid_k * M * N + mn, out, mask=mask)
        if FENCE:
            fence_gpu(offs_n)
        tl.debug_barrier()
        count = tl.atomic_add(lock_ptr + lock_id, 1)
        if count == split - 1:
            total = bias + tl.load(ws_ptr + mn, mask=mask, other=0.0, cache_modifier=".cg")
            for s in tl.static_range(1, SP):  # unrolled: the partials' loads are issued together
                live = (offs_m[:, None] < tl.where(s < split, M, 0)) & n_ok[None, :]
                total += tl.load(ws_ptr + s * M * N + mn, mask=live, other=0.0, cache_modifier=".cg")
            _store(y_ptr, mn, mask, total, SWIGLU, pos_ptr, HAS_POS)
            tl.atomic_xchg(lock_ptr + lock_id, 0)


@triton.jit
def grouped_tile(pid, grid_m, grid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid` over a grid_m x grid_n tile grid, GROUP_M row tiles at a time, so that
    programs running together share weight columns in L2."""
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    rows_m = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (pid % width) % rows_m, (pid % width) // rows_m


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """SMs of a CUDA device (4 off CUDA: the interpreter runs few programs, yet split-K is still exercised)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def split_k(num_blocks: int, tiles: int, target: int, step: int = 1) -> tuple[int, int]:
    """(splits, blocks per split): about `target` programs over `tiles` output tiles, whole `step`s each."""
    split = max(1, min(round(target / tiles), -(-num_blocks // step)))
    per = -(-num_blocks // split)
    per = -(-per // step) * step
    return -(-num_blocks // per), per
