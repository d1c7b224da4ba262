"""Static KV storage: one contiguous [slots, kv_heads, max_seq_len, head_dim] buffer per layer, and slot bookkeeping.

A slot holds one sequence; its tokens live at positions 0..len-1. Shapes never change after allocation, so
a decode step over all slots can be captured in a CUDA graph. Which request owns which slot is the
scheduler's business; this module only stores tensors and hands out free slot numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.config import ModelConfig


class KVCache:
    def __init__(self, config: ModelConfig, num_slots: int, max_seq_len: int, dtype: torch.dtype,
                 device: torch.device | str):
        shape = (config.num_layers, num_slots, config.num_kv_heads, max_seq_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots, self.max_seq_len = num_slots, max_seq_len
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def update(self, layer: int, rows: Tensor | None, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v [B, n_kv, T, D] at input_pos [B, T] of slots `rows` [B] (all slots when None)."""
        k_all, v_all = self.k[layer], self.v[layer]
        slot = rows[:, None] if rows is not None else torch.arange(k.shape[0], device=k.device)[:, None]
        k_all[slot, :, input_pos] = k.transpose(1, 2)
        v_all[slot, :, input_pos] = v.transpose(1, 2)
        if rows is None:
            return k_all, v_all
        return k_all[rows], v_all[rows]

    def allocate(self) -> int | None:
        """A free slot number, or None when every slot is taken."""
        return self._free.pop() if self._free else None

    def free(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not allocated")
        self._free.append(slot)

    @property
    def num_free(self) -> int:
        return len(self._free)
