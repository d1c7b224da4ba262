"""The M=1 GEMV that lowbit shipped before 2026-11-25 (commit 2d4e957), kept only so benchmarks/kernels.py can
time it side by side with the current one (`qmatmul._gemv_kernel`) in one run. Not used by the library."""

import torch
import triton
import triton.language as tl

from lowbit.kernels.qmatmul import SLOT, _common, _field, _finish, _load_x, _pow2, _sm_count, _split, _sub_term, fields_per_word


@triton.jit
def _run_sz(s_ptr, z_ptr, run, ok, offs_n, n_ok, N):
    """Scales and zeros [len(run), 1, BN] in float32 of runs `run` (0 where not `ok`)."""
    sz = run[:, None, None] * N + offs_n[None, None, :]
    mask = ok[:, None, None] & n_ok[None, None, :]
    s = tl.load(s_ptr + sz, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + sz, mask=mask, other=0.0).to(tl.float32)
    return s, z


@triton.jit
def _gemv_kernel(x_ptr, qw_ptr, qh_ptr, s_ptr, z_ptr, perm_ptr, b_ptr, ws_ptr, lock_ptr, y_ptr,
                 N, K, num_blocks, blocks_per_split,
                 BITS: tl.constexpr, FIELDS: tl.constexpr, GROUP_SLOTS: tl.constexpr, HAS_PERM: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BN: tl.constexpr, BPI: tl.constexpr, SP: tl.constexpr,
                 FENCE: tl.constexpr, SUB: tl.constexpr):
    """y[n] = sum_k x[k] W[k, n] for one row x, on CUDA cores. Per run: F*s*(sum_k x u - c * sum_k x).

    Registers bound it: the [BPI, 16, BN] tile and accumulator cost 2 * 16 * BPI * BN / (32 * num_warps)
    registers a thread, and at 64 words a thread (BN=512, 4 warps) only ~8 warps fit on an SM; the H100
    sweep (benchmarks/results/gpu.md) prefers 8 words a thread and many programs."""
    F: tl.constexpr = 4 if BITS == 3 else 1 << BITS
    OFF: tl.constexpr = 3 if BITS == 3 else 1
    RUNS: tl.constexpr = FIELDS // GROUP_SLOTS
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < N
    bi, wi = tl.arange(0, BPI), tl.arange(0, 16)
    acc = tl.zeros((BPI, 16, BN), tl.float32)
    b_start = pid_k * blocks_per_split
    b_end = tl.minimum(b_start + blocks_per_split, num_blocks)
    for i in range(b_start, b_end, BPI):
        blk = i + bi
        b_ok = blk < b_end
        wptr = (blk[:, None, None] * 16 + wi[None, :, None]) * N + offs_n[None, None, :]
        wmask = b_ok[:, None, None] & n_ok[None, None, :]
        words = tl.load(qw_ptr + wptr, mask=wmask, other=0)
        hi = words
        if BITS == 3:
            hi = tl.load(qh_ptr + wptr, mask=wmask, other=0).to(tl.int32)
        for a in tl.static_range(RUNS):
            s, z = _run_sz(s_ptr, z_ptr, blk * RUNS + a, b_ok, offs_n, n_ok, N)
            # this run's fields, summed per word row: no cross-thread work in the loop
            for jj in tl.static_range(GROUP_SLOTS):
                j = a * GROUP_SLOTS + jj
                row = blk[:, None] * (16 * FIELDS) + j * 16 + wi[None, :]
                xj = _load_x(x_ptr, row, b_ok[:, None], perm_ptr, K, HAS_PERM)[:, :, None]
                if SUB:
                    t = _sub_term(words, hi, xj, j, BITS, False)
                    if BITS == 3:
                        t += _sub_term(words, hi, xj, j, BITS, True)
                else:
                    t = xj * _field(words, hi, j, BITS)
                if jj == 0:
                    part = t
                    xs = xj
                else:
                    part += t
                    xs += xj
            if SUB:  # part = 2^-38 sum x q
                acc += (s * _pow2(38)) * part - (s * z) * xs
            else:  # part = sum x u, u = OFF + q/F
                acc += (s * F) * part - (s * (OFF * F + z)) * xs
    out = tl.sum(tl.sum(acc, axis=1), axis=0)
    _finish(out[None, :], tl.arange(0, 1), offs_n, 1, N, b_ptr, ws_ptr, lock_ptr, y_ptr, pid_n, pid_k,
            tl.num_programs(1), HAS_BIAS, SP, FENCE)



def gemv_previous(x2, w, bias, y, BN=64, BPI=1, split=None, num_warps=4, num_stages=1, denorm=True, waves=8):
    n, fields = w.out_features, fields_per_word(w.bits)
    num_blocks = w.padded_rows // (SLOT * fields)
    tiles = -(-n // BN)
    splits, per = _split(num_blocks, tiles, waves * _sm_count(x2.device), BPI) if split is None else (
        split, -(-num_blocks // split))
    qh, perm, b, fence = _common(w, x2, bias)
    ws = torch.empty(splits * n if splits > 1 else 1, dtype=torch.float32, device=x2.device)
    _gemv_kernel[(tiles, splits)](
        x2, w.qweight, qh, w.scales, w.zeros, perm, b, ws, w.locks, y,
        n, w.in_features, num_blocks, per,
        BITS=w.bits, FIELDS=fields, GROUP_SLOTS=w.group_slots, HAS_PERM=w.perm is not None,
        HAS_BIAS=bias is not None, BN=BN, BPI=BPI, SP=triton.next_power_of_2(splits), FENCE=fence,
        SUB=x2.dtype == torch.float16 and denorm, num_warps=num_warps, num_stages=num_stages)


