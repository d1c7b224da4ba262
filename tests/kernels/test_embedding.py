"""lowbit.kernels.embedding (Triton; the interpreter on CPU) against nn.Embedding, and, on a GPU, from a table
in pinned host memory, eagerly and inside a captured CUDA graph."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from lowbit.kernels.embedding import gather_rows
from tests.kernels.common import DEVICE


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("vocab,dim,ids_shape", [(50, 37, (2, 3)), (7, 2500, (1, 1)), (300, 64, (4, 9)),
                                                 (5, 1, (3,))])
def test_gather_matches_nn_embedding(dtype, vocab, dim, ids_shape):
    emb = nn.Embedding(vocab, dim).to(DEVICE, dtype)
    ids = torch.randint(0, vocab, ids_shape, device=DEVICE)
    ids.view(-1)[0] = vocab - 1  # the last row: its end is the table's end
    got = gather_rows(emb.weight.detach(), ids)
    assert got.shape == (*ids_shape, dim) and got.dtype == dtype
    assert torch.equal(got, emb(ids).detach())  # a copy: bit-exact


def test_no_tokens_and_bad_table():
    table = torch.randn(10, 8, device=DEVICE)
    assert gather_rows(table, torch.zeros(2, 0, dtype=torch.long, device=DEVICE)).shape == (2, 0, 8)
    with pytest.raises(ValueError, match="contiguous"):
        gather_rows(table.t(), torch.zeros(1, dtype=torch.long, device=DEVICE))


@pytest.mark.gpu
def test_gather_from_pinned_host_memory_in_a_cuda_graph():
    table = torch.randn(1000, 320, dtype=torch.float16).pin_memory()
    ids = torch.randint(0, 1000, (3, 5), device="cuda")
    assert torch.equal(gather_rows(table, ids).cpu(), nn.functional.embedding(ids.cpu(), table))
    gather_rows(table, ids)  # warm-up outside the capture (compiles)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gather_rows(table, ids)
    for _ in range(2):  # new ids each replay, read through the captured pointer to host memory
        ids.copy_(torch.randint(0, 1000, (3, 5), device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out.cpu(), nn.functional.embedding(ids.cpu(), table))
