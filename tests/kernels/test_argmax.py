"""lowbit.kernels.argmax against torch's argmax: row lengths around the loop step, ties within and across
steps, every float dtype, rows of -inf."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from lowbit.kernels import argmax as argmax_module
from lowbit.kernels.argmax import argmax
from tests.kernels.common import DEVICE, skip_bf16_interpreted


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("vocab", [1, 5, 64, 65, 200])
def test_argmax_matches_torch(monkeypatch, dtype, vocab):
    skip_bf16_interpreted(dtype)
    monkeypatch.setattr(argmax_module, "BLOCK", 64)  # several loop steps at small sizes
    x = torch.randn(3, 2, vocab, device=DEVICE).to(dtype)
    got = argmax(x)
    assert got.dtype == torch.int64 and got.shape == (3, 2)
    assert torch.equal(got, x.argmax(-1))


def test_ties_go_to_the_smallest_index_within_and_across_steps(monkeypatch):
    monkeypatch.setattr(argmax_module, "BLOCK", 16)
    x = torch.zeros(4, 50, device=DEVICE)
    x[0, [3, 9]] = 2.0  # one step
    x[1, [40, 17, 33]] = 2.0  # three steps
    x[2] = float("-inf")  # nothing finite: index 0, as torch
    x[3, 49] = 1.0  # in the last, partial step
    assert argmax(x).tolist() == x.argmax(-1).tolist() == [3, 17, 0, 49]


def test_a_strided_view_and_the_empty_cases():
    x = torch.randn(6, 40, device=DEVICE)
    assert torch.equal(argmax(x[::2, 1:]), x[::2, 1:].argmax(-1))
    assert argmax(torch.zeros(0, 7, device=DEVICE)).shape == (0,)
    with pytest.raises(ValueError, match="empty"):
        argmax(torch.zeros(2, 0, device=DEVICE))
