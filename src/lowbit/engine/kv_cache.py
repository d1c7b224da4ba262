"""Static KV storage: one contiguous [slots, kv_heads, max_seq_len, head_dim] buffer per layer, slot
bookkeeping, and attention over it (`attend`, the model's Cache protocol).

A slot holds one sequence; its tokens live at positions 0..len-1. Shapes never change after allocation, so
a decode step over all slots can be captured in a CUDA graph. Which request owns which slot is the
scheduler's business; this module stores tensors, hands out free slot numbers and picks the attention
kernel: on CUDA a decode step appends and attends in one Triton launch (`lowbit.kernels.attention`) and a
fresh prefill uses flash attention; elsewhere the torch reference with a mask.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lowbit.config import ModelConfig
from lowbit.kernels import ops
from lowbit.kernels.layout import place_channels
from lowbit.kernels.reference import sdpa_reference

if TYPE_CHECKING:
    from lowbit.kernels.partials import AttentionPartials
    from lowbit.kernels.qmatmul import ChannelOrder


class KVCache:
    def __init__(self, config: ModelConfig, num_slots: int, max_seq_len: int, dtype: torch.dtype,
                 device: torch.device | str):
        shape = (config.num_layers, num_slots, config.num_kv_heads, max_seq_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots, self.max_seq_len = num_slots, max_seq_len
        self._free = list(range(num_slots - 1, -1, -1))
        # split counters of the decode-attention kernel, for up to next_pow2(num_slots) rows (CUDA-graph buckets)
        rows = 1 << max(0, num_slots - 1).bit_length()
        self.locks = torch.zeros(rows * config.num_kv_heads, dtype=torch.int32, device=device)

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

    def attend(self, layer: int, rows: Tensor | None, input_pos: Tensor, q: Tensor, k: Tensor, v: Tensor,
               fresh: bool, rope: tuple[Tensor, Tensor], order: ChannelOrder | None = None,
               merged: bool = True) -> Tensor | AttentionPartials:
        """q [B, T, H, D], k/v [B, T, n_kv, D] (RoPE not applied yet) -> attention output [B, T, H * D].

        q and k are rotated by rope = (cos, sin) [B, T, D] (on CUDA q/k may be rotated in place), then k/v are
        stored at input_pos of slots `rows`. Each token sees the cached positions up to its own; fresh: the
        rows are new sequences at positions 0..T-1, attending among themselves. order: the
        output's channels (head c // D, dim c % D for channel c) come in this order (for an act-order wo).
        merged=False: one-token decode on CUDA returns its kernel's unmerged per-split partials instead (for a wo
        that merges them as it loads them: `qmatmul.add_partials`); other calls ignore it.
        """
        B, T, H, D = q.shape
        if self.decodes_in_kernel(q, fresh):  # decode: rotate, append, attend in one launch
            from lowbit.kernels.attention import decode_attention

            slots = rows if rows is not None else torch.arange(B, device=q.device)
            out = decode_attention(q[:, 0], k[:, 0], v[:, 0], self.k[layer], self.v[layer], slots,
                                   input_pos[:, 0], self.locks, rope=(rope[0][:, 0], rope[1][:, 0]),
                                   order=order, merge=merged)
            return out.view(B, 1, H * D) if merged else out
        dtype = self.k.dtype  # q/k/v may come as float32 sums (`Block.forward_into`)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        q, k = ops.rope(q, *rope, H), ops.rope(k, *rope, k.shape[2])
        k_all, v_all = self.update(layer, rows, input_pos, k.transpose(1, 2), v.transpose(1, 2))
        mask = None
        if fresh:
            k_all, v_all = k.transpose(1, 2), v.transpose(1, 2)
        else:  # [B, 1, T, S]: what each token sees (built here: the kernel above reads positions instead)
            mask = (torch.arange(self.max_seq_len, device=q.device) <= input_pos[..., None])[:, None]
        y = sdpa_reference(q.transpose(1, 2), k_all, v_all, mask).transpose(1, 2).reshape(B, T, H * D)
        return place_channels(y, order)

    def decodes_in_kernel(self, q: Tensor, fresh: bool) -> bool:
        """Whether `attend` runs one-token decode in `decode_attention`'s kernel (CUDA; the CPU computes it in
        torch)."""
        return q.is_cuda and q.shape[1] == 1 and not fresh

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
