"""lowbit.kernels.gptq_block: the Triton block sweep against its torch reference.

Runs on CPU through Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported), where the two
must agree bit for bit, and on CUDA when present, where fused multiply-adds may move a rare code across a
rounding midpoint. Outputs are poisoned before each run; shapes are awkward on purpose (one row, rows not
a multiple of the tile, one column, short last blocks, strided views, groups in any order).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from lowbit.kernels.gptq_block import gptq_block_reference, gptq_block_triton
from tests.kernels.common import DEVICE


def upper_factor(b: int, g: torch.Generator) -> torch.Tensor:
    """A realistic Hinv block: the upper Cholesky factor of an SPD inverse, column-major as torch returns it."""
    A = torch.randn(b, 2 * b, generator=g)
    H = A @ A.t() / b + 0.05 * torch.eye(b)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


def run_both(W1, Hinv1, scales, zeros, col_group, maxq, **kw):
    b, n = W1.shape[1], W1.shape[0]
    out = []
    for fn, kwargs in ((gptq_block_reference, {}), (gptq_block_triton, kw)):
        codes = torch.full((b, n), 255, dtype=torch.uint8, device=DEVICE)
        err = torch.full((b, n), float("nan"), device=DEVICE)
        fn(W1, Hinv1, scales, zeros, col_group, maxq, codes, err, **kwargs)
        out.append((codes, err))
    return out


def check(ref, got):
    (c0, e0), (c1, e1) = ref, got
    assert not torch.isnan(e1).any()
    if DEVICE == "cpu":
        assert torch.equal(c0, c1) and torch.equal(e0, e1)
    else:
        assert (c0 != c1).float().mean() < 1e-3
        torch.testing.assert_close(e1, e0, rtol=1e-3, atol=1e-3 * float(e0.abs().max()))


CASES = [  # rows, block columns, groups, bits, sym, block_n
    (1, 128, 1, 4, True, 16),
    (37, 128, 3, 4, False, 16),
    (16, 1, 1, 3, True, 16),
    (50, 100, 2, 2, False, 8),
    (33, 17, 5, 8, False, 32),
    (70, 64, 2, 3, False, 64),
]


@pytest.mark.parametrize("n,b,groups,bits,sym,block_n", CASES)
def test_matches_reference(n, b, groups, bits, sym, block_n):
    g = torch.Generator().manual_seed(n * 1000 + b)
    maxq = (1 << bits) - 1
    wide = torch.randn(n, b + 9, generator=g)
    W1 = wide[:, 3:3 + b].to(DEVICE)  # a strided view, like W[:, i1:i2]
    Hinv1 = upper_factor(b, g).to(DEVICE)
    scales = ((W1.abs().amax(1) + 0.1) * 2 / maxq).half().float().expand(groups, n).contiguous()
    scales = scales * torch.linspace(0.7, 1.2, groups, device=DEVICE)[:, None]
    if sym:
        zeros = torch.full((groups, n), float((maxq + 1) // 2), device=DEVICE)
    else:
        zeros = torch.randint(0, maxq + 1, (groups, n), generator=g).float().to(DEVICE)
    col_group = torch.randint(0, groups, (b,), generator=g, dtype=torch.int32).to(DEVICE)
    ref, got = run_both(W1, Hinv1, scales, zeros, col_group, maxq, block_n=block_n, num_warps=2)
    check(ref, got)
    assert int(ref[0].max()) <= maxq


def test_ties_round_half_to_even():
    """w / s exactly on .5 must round like torch.round (to even), for either sign."""
    n, b = 24, 16
    halves = torch.arange(-n // 2, n // 2, dtype=torch.float32) + 0.5  # -11.5 .. 11.5
    W1 = (halves[:, None] * 0.25).expand(n, b).contiguous().to(DEVICE)  # w / 0.25 = k + 0.5
    Hinv1 = torch.eye(b, device=DEVICE)  # no error feedback: every column keeps its tie
    scales = torch.full((1, n), 0.25, device=DEVICE)
    zeros = torch.full((1, n), 128.0, device=DEVICE)
    col_group = torch.zeros(b, dtype=torch.int32, device=DEVICE)
    ref, got = run_both(W1, Hinv1, scales, zeros, col_group, 255)
    expected = (torch.round(halves) + 128).to(torch.uint8).to(DEVICE)
    assert torch.equal(ref[0][0], expected)
    assert torch.equal(got[0], ref[0])
