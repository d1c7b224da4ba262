"""Triton gather of embedding rows, out[i] = table[ids[i]], from a table in device memory or in pinned host
memory.

Pinned host memory is mapped into the GPU's address space (unified virtual addressing), so a kernel can load
from it directly over PCIe; Triton's launcher accepts such a tensor (it asks the driver for the pointer's
device address, which pinned memory has). One launch, no host work: it can run inside a captured CUDA graph,
where torch's CPU-side `index_select` cannot. The reference is `torch.nn.functional.embedding`.
Tensors in, tensors out.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit.kernels.sync import pdl_launch, release_next, wait_previous

MAX_BLOCK = 1024  # columns per program: 2 KB of float16 per load, many loads in flight across PCIe


@triton.jit
def _gather_kernel(table_ptr, ids_ptr, out_ptr, D, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """One program per (token, column block): copy BLOCK columns of the token's row."""
    release_next(PDL)
    wait_previous(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < D
    token = tl.load(ids_ptr + row).to(tl.int64)
    values = tl.load(table_ptr + token * D + offs, mask=ok)
    tl.store(out_ptr + row * D + offs, values, mask=ok)


def gather_rows(table: Tensor, ids: Tensor) -> Tensor:
    """table [V, D] (device or pinned host memory), ids int [...] in [0, V) -> [..., D] on ids' device.

    ids are not range-checked here (a bad id reads outside the table): callers validate token ids, as the
    engine does when a request is added.
    """
    if table.dim() != 2 or not table.is_contiguous():
        raise ValueError(f"the table must be a contiguous [vocab, dim] tensor, got shape {tuple(table.shape)}")
    d = table.shape[1]
    out = torch.empty(*ids.shape, d, dtype=table.dtype, device=ids.device)
    flat = ids.reshape(-1).contiguous()
    if flat.numel() == 0:
        return out
    block = min(MAX_BLOCK, triton.next_power_of_2(d))
    _gather_kernel[(flat.numel(), triton.cdiv(d, block))](table, flat, out, d, BLOCK=block, **pdl_launch(ids))
    return out
