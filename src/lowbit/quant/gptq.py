"""GPTQ (Frantar et al. 2022, "Accurate Post-Training Quantization for Generative Pre-trained Transformers").

Owns the algorithm only: GPTQ(W).add_batch(x) accumulates H = 2/n sum x x^T, and .quantize(cfg) returns a
`QuantResult` (codes, zero points, fp16 scales, g_idx, loss, W_q). It follows IST-DASLab/gptq `gptq.py` and
AutoGPTQ / GPTQModel `quantization/gptq.py` step for step (dead columns, act-order, static groups, lazy
block updates, on-the-fly group parameters, g_idx); scale/zero search is `quant/quantizer.py`, packing is
`quant/pack.py`, and hooks, layers and the calibration loop are `quant/calibrate.py`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import torch
from torch import Tensor

from lowbit.config import QuantConfig
from lowbit.errors import LowbitError
from lowbit.quant.quantizer import QuantResult, find_params, quantize_codes

__all__ = ["GPTQ", "QuantResult", "inverse_hessian_cholesky"]

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
        x = x.reshape(-1, x.shape[-1]).to(self.H.device, torch.float32)
        m = x.shape[0]
        if m == 0:
            return
        total = self.nsamples + m
        self.H.addmm_(x.t(), x, beta=self.nsamples / total, alpha=2 / total)
        self.nsamples = total

    def quantize(self, cfg: QuantConfig, blocksize: int = 128, mse: bool = False) -> QuantResult:
        """Quantize W with cfg.bits / group_size / desc_act / sym / static_groups / damp_percent.

        H is left untouched, so the same layer can be quantized again with other settings.
        """
        if self.nsamples == 0:
            raise LowbitError("GPTQ.quantize needs calibration inputs: call add_batch first")
        if blocksize <= 0:
            raise LowbitError(f"blocksize must be positive, got {blocksize}")
        H = self.H.clone()
        if not torch.isfinite(H).all():
            raise LowbitError("the Hessian has inf/NaN entries: the calibration inputs are not finite")
        W = self.W.to(H.device, torch.float32, copy=True)
        n, k = W.shape
        dead = H.diagonal() == 0
        H[dead, dead] = 1
        W[:, dead] = 0

        gs = k if cfg.group_size == -1 else cfg.group_size
        scales = torch.zeros(math.ceil(k / gs), n, dtype=torch.float32, device=W.device)
        zeros = torch.zeros_like(scales)
        upfront = cfg.group_size == -1 or cfg.static_groups
        if upfront:  # groups of the unpermuted W, as the references' static_groups (or the one -1 group)
            for g in range(scales.shape[0]):
                scales[g], zeros[g] = find_params(W[:, g * gs:(g + 1) * gs], cfg.bits, cfg.sym, mse)

        perm = None
        if cfg.desc_act:
            perm = torch.argsort(H.diagonal(), descending=True, stable=True)
            W, H = W[:, perm], H[perm][:, perm]
        Hinv, damp = inverse_hessian_cholesky(H, cfg.damp_percent)
        del H

        position = torch.arange(k, device=W.device)
        col_group = (perm if perm is not None and upfront else position) // gs  # group of column i of W
        Q, C, loss = self._sweep(W, Hinv, col_group.tolist(), scales, zeros, cfg, blocksize, mse, upfront)

        if perm is not None:
            invperm = torch.argsort(perm)
            Q, C, col_group = Q[:, invperm], C[:, invperm], col_group[invperm]
        return QuantResult(
            codes=C.t().contiguous(),
            zeros=zeros.to(torch.int32),
            scales=scales.to(torch.float16),
            g_idx=col_group.to(torch.int32),
            loss=loss,
            damp_used=damp,
            W_q=Q,
        )

    @staticmethod
    def _sweep(W: Tensor, Hinv: Tensor, col_group: list[int], scales: Tensor, zeros: Tensor,
               cfg: QuantConfig, blocksize: int, mse: bool, upfront: bool) -> tuple[Tensor, Tensor, float]:
        """Quantize the columns of W [N, K] in order, feeding each one's error forward through Hinv.

        Fills scales/zeros [G, N] at group starts unless `upfront`. -> (Q float32 [N, K], codes uint8
        [N, K], loss). Within a block of columns the update is column by column; the rest of W gets one
        matmul per block (the references' lazy batch updates).
        """
        n, k = W.shape
        maxq = (1 << cfg.bits) - 1
        gs = k if cfg.group_size == -1 else cfg.group_size
        Q = torch.empty_like(W)
        C = torch.empty(n, k, dtype=torch.uint8, device=W.device)
        loss = torch.zeros((), dtype=torch.float64, device=W.device)
        for i1 in range(0, k, blocksize):
            i2 = min(i1 + blocksize, k)
            W1 = W[:, i1:i2].clone()
            C1, Err1 = torch.empty_like(W1), torch.empty_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                if not upfront and col % gs == 0:  # parameters from W as it stands (block-lazy), as reference
                    g = col // gs
                    scales[g], zeros[g] = find_params(W[:, col:col + gs], cfg.bits, cfg.sym, mse)
                s, z = scales[col_group[col]], zeros[col_group[col]]
                w = W1[:, i]
                c = quantize_codes(w, s, z, maxq)
                q = (c - z) * s
                C1[:, i] = c
                Q[:, col] = q
                err = (w - q) / Hinv1[i, i]
                W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
                Err1[:, i] = err
            C[:, i1:i2] = C1.to(torch.uint8)
            loss += Err1.double().pow(2).sum() / 2
            W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)
        return Q, C, float(loss)


def _damp_schedule(damp_percent: float) -> Iterator[float]:
    """damp_percent, then +damp_percent per try up to 1, then 10, 100, 1000 (pathological H only)."""
    step = damp_percent if damp_percent > 0 else 0.01
    damp, j = damp_percent, 0
    while damp < 1:
        yield damp
        j += 1
        damp = damp_percent + j * step
    yield from (1.0, 10.0, 100.0, 1000.0)


def inverse_hessian_cholesky(H: Tensor, damp_percent: float) -> tuple[Tensor, float]:
    """H [K, K] float32 (modified in place) -> (upper Cholesky factor of (H + damp*mean(diag H)*I)^-1, damp).

    Dampening starts at damp_percent and grows (see _damp_schedule) until both factorizations succeed;
    one warning names the dampening that worked.
    """
    diag = H.diagonal()
    base = diag.clone()
    mean = base.mean()
    for damp in _damp_schedule(damp_percent):
        diag.copy_(base + damp * mean)
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) != 0:
            continue
        U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
        if int(info) == 0 and bool(torch.isfinite(U.diagonal()).all()):
            if damp != damp_percent:
                logger.warning("Hessian not positive definite at damp_percent=%g; used damp_percent=%g",
                               damp_percent, damp)
            return U, damp
    raise LowbitError(f"the Hessian stays singular even with damp_percent=1000 (in_features={H.shape[0]})")
