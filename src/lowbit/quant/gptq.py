"""GPTQ (Frantar et al. 2022, "Accurate Post-Training Quantization for Generative Pre-trained Transformers").

Owns the algorithm only: GPTQ(W).add_batch(x) accumulates H = 2/n sum x x^T, and .quantize(cfg) returns a
`QuantResult` (codes, zero points, fp16 scales, g_idx, loss; W_q on demand). It follows IST-DASLab/gptq `gptq.py` and
AutoGPTQ / GPTQModel `quantization/gptq.py` step for step (dead columns, act-order, static groups, lazy
block updates, on-the-fly group parameters, g_idx) and GPTQModel's group-aware reordering (GAR, `gar.py`);
scale/zero search is `quant/quantizer.py`, packing is `quant/pack.py`, and hooks, layers and the
calibration loop are `quant/calibrate.py`.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator

import torch
from torch import Tensor

from lowbit.config import QuantConfig
from lowbit.errors import LowbitError
from lowbit.kernels.gptq_block import gptq_block
from lowbit.quant.quantizer import QuantResult, group_params

__all__ = ["GPTQ", "QuantResult", "accumulate_xtx", "group_aware_order", "inverse_hessian_cholesky"]

logger = logging.getLogger(__name__)


class GPTQ:
    """One linear layer's GPTQ state: its weight W [N, K] and the running Hessian H [K, K] (float32)."""

    def __init__(self, W: Tensor):
        if W.dim() != 2 or not W.is_floating_point():
            raise LowbitError(f"GPTQ needs a float weight [out_features, in_features], got {W.dtype} {tuple(W.shape)}")
        self.W = W  # read (and copied to float32) by quantize; never modified
        self.H = torch.zeros(W.shape[1], W.shape[1], dtype=torch.float32, device=W.device)
        self.nsamples = 0

    def add_batch(self, x: Tensor) -> None:
        """x [..., K]: layer inputs; every row counts as one sample of the running mean H = 2/n sum x x^T."""
        if x.shape[-1] != self.H.shape[0]:
            raise LowbitError(f"input has {x.shape[-1]} features, the layer has in_features={self.H.shape[0]}")
        x = x.reshape(-1, x.shape[-1]).to(self.H.device)
        m = x.shape[0]
        if m == 0:
            return
        total = self.nsamples + m
        accumulate_xtx(self.H, x, beta=self.nsamples / total, alpha=2 / total)
        self.nsamples = total

    def quantize(self, cfg: QuantConfig, blocksize: int = 128, mse: bool = False,
                 keep_hessian: bool = True) -> QuantResult:
        """Quantize W with cfg.bits / group_size / desc_act / act_group_aware / sym / static_groups / damp_percent.

        keep_hessian: leave H as it is, so that the layer can be quantized again with other settings;
        False releases it as soon as it is copied, which lowers the peak memory by one [K, K] matrix.
        Asymmetric zero points stay >= 1 when cfg asks for the v1 "gptq" format, which cannot store 0.
        """
        if self.nsamples == 0:
            raise LowbitError("GPTQ.quantize needs calibration inputs: call add_batch first")
        if self.H is None:
            raise LowbitError("this layer's Hessian was released by quantize(keep_hessian=False)")
        if blocksize <= 0:
            raise LowbitError(f"blocksize must be positive, got {blocksize}")
        H = self.H
        if not bool(torch.isfinite(H.sum())):
            raise LowbitError("the Hessian has inf/NaN entries: the calibration inputs are not finite")
        n, k = self.W.shape
        dead = H.diagonal() == 0
        W = self.W.to(H.device, torch.float32, copy=True)
        W[:, dead] = 0
        zero_min = 1 if not cfg.sym and cfg.checkpoint_format == "gptq" else 0
        gs = k if cfg.group_size == -1 else cfg.group_size
        upfront = cfg.group_size == -1 or cfg.static_groups
        if upfront:  # groups of the unpermuted W, as the references' static_groups (or the one -1 group)
            scales, zeros = group_params(W, cfg.group_size, cfg.bits, cfg.sym, mse, zero_min)
        else:
            scales = torch.zeros(math.ceil(k / gs), n, dtype=torch.float32, device=W.device)
            zeros = torch.zeros_like(scales)

        perm, group_perm = None, None
        if cfg.desc_act:
            perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        elif cfg.gar:
            perm, group_perm = group_aware_order(H.diagonal(), gs)
        order = torch.arange(k, device=H.device) if perm is None else perm
        if perm is not None:
            W = W[:, perm]
        r = order.flip(0)  # Hf = J P^T H P J: the permuted H with rows and columns reversed
        Hf = H.index_select(0, r)
        if not keep_hessian:  # before the second gather: at most two [K, K] matrices live
            self.H = H = None
        Hf = Hf.index_select(1, r)
        Hf.diagonal()[dead[order.flip(0)]] = 1
        Hinv, damp = inverse_hessian_cholesky(Hf, cfg.damp_percent, flipped=True)
        del Hf  # scratch now

        col_group = ((perm if perm is not None and upfront else torch.arange(k, device=W.device)) // gs)
        col_group = col_group.to(torch.int32)
        codes, loss = _sweep(W, Hinv, col_group, scales, zeros, cfg, blocksize, mse, upfront, zero_min)
        del W, Hinv

        if group_perm is not None and not upfront:  # grids were found in the sweep's group order
            scales, zeros, col_group = _groups_in_file_order(scales, zeros, col_group, group_perm)
        if perm is not None:
            invperm = torch.argsort(perm)
            codes, col_group = codes[invperm], col_group[invperm]
        return QuantResult(
            codes=codes,
            zeros=zeros.to(torch.int32),
            scales=scales.to(torch.float16),
            g_idx=col_group,
            loss=loss,
            damp_used=damp,
        )


def group_aware_order(d: Tensor, gs: int) -> tuple[Tensor, Tensor]:
    """GAR, group-aware reordering (Gafni et al. 2025; GPTQModel's `act_group_aware`): a column order for
    GPTQ that, unlike act-order, keeps each group's columns together, so the file's g_idx stays i // gs.

    d [K]: the Hessian diagonal. Inside each full group of gs columns, columns by decreasing d; the groups
    by decreasing largest d; a partial last group (K % gs columns) stays last in its own order, as GPTQModel
    leaves it. Sorts are stable. -> (perm [K], perm[position] = column; group_perm [K // gs],
    group_perm[position] = group).
    """
    k = d.numel()
    full = k // gs
    local = torch.sort(d[:full * gs].view(full, gs), dim=1, descending=True, stable=True)
    group_perm = torch.argsort(local.values[:, 0], descending=True, stable=True)
    base = torch.arange(full, device=d.device).unsqueeze(1) * gs
    perm = (local.indices + base)[group_perm].reshape(-1)
    return torch.cat([perm, torch.arange(full * gs, k, device=d.device)]), group_perm


def _groups_in_file_order(scales: Tensor, zeros: Tensor, col_group: Tensor,
                          group_perm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Grids found at GAR group positions -> the same grids at their groups' own indices.

    scales/zeros [G, N] with row j the grid of the j-th group the sweep met; col_group [K] the position of
    each (permuted) column's group. Group j is group_perm[j] (the partial last group stays last).
    """
    G = scales.shape[0]
    order = torch.cat([group_perm, torch.arange(group_perm.numel(), G, device=group_perm.device)])
    file_scales, file_zeros = torch.empty_like(scales), torch.empty_like(zeros)
    file_scales[order], file_zeros[order] = scales, zeros
    return file_scales, file_zeros, order.to(col_group.dtype)[col_group.long()]


def _sweep(W: Tensor, Hinv: Tensor, col_group: Tensor, scales: Tensor, zeros: Tensor, cfg: QuantConfig,
           blocksize: int, mse: bool, upfront: bool, zero_min: int) -> tuple[Tensor, float]:
    """Quantize the columns of W [N, K] (modified) in order, feeding each one's error forward through Hinv.

    Fills scales/zeros [G, N] unless `upfront`. -> (codes uint8 [K, N], loss). A block of columns is one
    `gptq_block` call (column by column inside); the rest of W gets one matmul per block (the references'
    lazy batch updates). A group's grid comes from W as its first column's block starts: the references
    compute it from W, which they update only between blocks, when the sweep reaches that column.
    """
    n, k = W.shape
    maxq = (1 << cfg.bits) - 1
    gs = k if cfg.group_size == -1 else cfg.group_size
    codes = torch.empty(k, n, dtype=torch.uint8, device=W.device)
    err = torch.empty(min(blocksize, k), n, dtype=torch.float32, device=W.device)
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        first = -(-i1 // gs)  # groups first..last-1 start in this block
        last = -(-i2 // gs)
        if not upfront and last > first:
            cols = W[:, first * gs:min(last * gs, k)]
            scales[first:last], zeros[first:last] = group_params(cols, gs, cfg.bits, cfg.sym, mse, zero_min)
        E = err[:i2 - i1]
        gptq_block(W[:, i1:i2], Hinv[i1:i2, i1:i2], scales, zeros, col_group[i1:i2], maxq, codes[i1:i2], E)
        loss += E.double().pow(2).sum() / 2
        W[:, i2:].addmm_(E.t(), Hinv[i1:i2, i2:], alpha=-1)
    return codes, float(loss)


def accumulate_xtx(H: Tensor, x: Tensor, beta: float, alpha: float) -> None:
    """H [K, K] float32 <- beta * H + alpha * x^T x for x [M, K].

    fp16/bf16 inputs on CUDA multiply on the tensor cores with float32 output: products of 11-bit (8-bit)
    mantissas are exact in float32 and summed in float32, so this equals the float32 product of the same
    inputs up to summation order, at the half-precision rate. Elsewhere x is converted to float32.
    """
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and _half_mm_to_float():
        torch.addmm(H, x.t(), x, out_dtype=torch.float32, beta=beta, alpha=alpha, out=H)
    else:
        x = x.float()
        H.addmm_(x.t(), x, beta=beta, alpha=alpha)


@functools.cache
def _half_mm_to_float() -> bool:
    """Whether this torch has addmm(..., out_dtype=float32) for half inputs on CUDA (torch >= 2.8)."""
    try:
        a = torch.ones(16, 16, dtype=torch.float16, device="cuda")
        out = torch.zeros(16, 16, dtype=torch.float32, device="cuda")
        torch.addmm(out, a, a, out_dtype=torch.float32, beta=0.5, alpha=2.0, out=out)
        return bool((out == 32).all())
    except (RuntimeError, TypeError):
        logger.info("this torch has no half x half -> float32 matmul; the Hessian is accumulated in float32")
        return False


def _damp_schedule(damp_percent: float) -> Iterator[float]:
    """damp_percent, then +damp_percent per try up to 1, then 10, 100, 1000 (pathological H only)."""
    step = damp_percent if damp_percent > 0 else 0.01
    damp, j = damp_percent, 0
    while damp < 1:
        yield damp
        j += 1
        damp = damp_percent + j * step
    yield from (1.0, 10.0, 100.0, 1000.0)


def inverse_hessian_cholesky(H: Tensor, damp_percent: float, flipped: bool = False) -> tuple[Tensor, float]:
    """H [K, K] float32 -> (upper Cholesky factor of (H + damp*mean(diag H)*I)^-1, damp).

    One Cholesky factorization and one triangular inverse instead of the references' three steps
    (Cholesky, cholesky_inverse, Cholesky): with J the reversal permutation and JHJ = LL^T, H = (JLJ)(JLJ)^T
    with JLJ upper triangular, so H^-1 = V^T V with V = (JLJ)^-1 = J L^-1 J upper triangular with a
    positive diagonal, which makes V the (unique) upper Cholesky factor of H^-1. Half the flops, same
    float32 accuracy. `flipped`: H is already JHJ, and its memory is reused as scratch (at most two
    [K, K] matrices live at once; H itself is left as it was otherwise). Dampening starts at
    damp_percent and grows (see _damp_schedule) until the factorization succeeds; one warning names
    the dampening that worked.
    """
    Hf = H if flipped else H.flip(0, 1)
    diag = Hf.diagonal()
    base = diag.clone()
    mean = base.mean()
    for damp in _damp_schedule(damp_percent):
        diag.copy_(base + damp * mean)
        L, info = torch.linalg.cholesky_ex(Hf)
        if int(info) != 0:
            continue
        Hf.zero_()
        diag.fill_(1)
        torch.linalg.solve_triangular(L, Hf, upper=False, out=Hf)  # L^-1, in place of the identity
        del L
        U = Hf.flip(0, 1)
        if bool(torch.isfinite(U.diagonal()).all()):
            if damp != damp_percent:
                logger.warning("Hessian not positive definite at damp_percent=%g; used damp_percent=%g",
                               damp_percent, damp)
            return U, damp
        raise LowbitError(f"the inverse Hessian factor is not finite (in_features={H.shape[0]}); "
                          "raise damp_percent")
    raise LowbitError(f"the Hessian stays singular even with damp_percent=1000 (in_features={H.shape[0]})")
