"""Decode attention's per-split partial softmaxes, left for the kernel after it (o_proj) to merge.

Flash-decoding splits a row's cached positions; each split ends with (m, l, acc): its running max (log2
units), its sum of exp2(s - m) and its unnormalised output. Merging them inside the attention kernel costs a
fence, a counter and a reload of the partials by the last split, all on the decode step's critical path; a
one-row o_proj on the mma kernel instead merges the rows it reads as it loads x (`lowbit.kernels.mma`'s XMG).
`merge` is the torch reference.

Measured in a whole 7B batch-1 decode step on an H100 (`benchmarks/decode_sweep.py`, both trees in one call,
2026-12-07): with PDL (Hopper) no change, 1933.6-1937.8 against 1937.3-1939.1 µs, since the merge overlapped
o_proj's early weight loads; without PDL (`LOWBIT_PDL=0`, as on GPUs before Hopper) 1.4 % faster, 2200.5-2212.1
against 2174.0-2177.0 µs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class AttentionPartials:
    """ws (float32) holds m [n], then l [n], then acc [n, stride] (the first head_dim used), n = rows * heads *
    splits, entry (row * heads + head) * splits + split. Splits with nothing to do hold m -inf, l 0, acc 0.

    sources (int32 [heads * head_dim]; for an act-order o_proj, which reads its input in `layout.ChannelOrder`):
    acc is placed instead, [rows, splits, heads * head_dim] with column j holding channel sources[j], so that the
    reader's rows of acc stay contiguous and only the small m and l are gathered (through sources[j] // head_dim);
    the merge then comes out in that column order."""

    ws: Tensor
    rows: int
    heads: int
    head_dim: int
    stride: int
    splits: int
    sources: Tensor | None = None

    @property
    def entries(self) -> int:
        return self.rows * self.heads * self.splits

    def merge(self, dtype: torch.dtype) -> Tensor:
        """The attention output [rows, heads * head_dim] in dtype."""
        n, shape = self.entries, (self.rows, self.heads, self.splits)
        m, l = self.ws[:n].view(shape), self.ws[n:2 * n].view(shape)
        w = torch.exp2(m - m.amax(-1, keepdim=True))
        if self.sources is not None:  # per column j: the splits of head sources[j] // head_dim
            channels = self.heads * self.head_dim
            acc = self.ws[2 * n:2 * n + self.rows * self.splits * channels].view(self.rows, self.splits, channels)
            head = (self.sources // self.head_dim).long()
            w, l = w[:, head], l[:, head]  # [rows, columns, splits]
            return ((w.transpose(1, 2) * acc).sum(1) / (w * l).sum(-1)).to(dtype)
        acc = self.ws[2 * n:2 * n + n * self.stride].view(*shape, self.stride)[..., :self.head_dim]
        out = (w[..., None] * acc).sum(2) / (w * l).sum(-1)[..., None]
        return out.to(dtype).reshape(self.rows, self.heads * self.head_dim)
