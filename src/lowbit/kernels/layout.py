"""The weight layouts the GPTQ kernels read (`QWeight`) and their construction from a checkpoint (`repack`).

Torch only: the kernels that read these layouts live in `lowbit.kernels.gemv`, `lowbit.kernels.dot` and
`lowbit.kernels.dequant` (the "slots" layout, every bit width), `lowbit.kernels.mma` and `lowbit.kernels.mma_dot`
(the "mma" layout, 4-bit); `lowbit.kernels.reference` unpacks both.

Both layouts first sort the input rows by group (stable; act-order's `perm`), each group padded to a multiple of
16 rows, the total to whole blocks, and store scales and zeros once per run of rows that share a group, so
kernels index them without a g_idx lookup.

"slots": a block holds 16*F rows (F fields per int32 word: 8 for 4-bit, 4 for 8-bit, 16 for 2-bit and for the
low two bits of 3-bit) in 16 words per column; field j of word w holds row 16*j + w, so each field of a 16-word
tile is 16 consecutive rows ("a slot") with one group.

"mma" (4-bit): each int32 word is one thread's A operand of a tensor-core mma.m16n8k16 whose M is 16 output
columns and whose K is 16 rows (see `lowbit.kernels.mma`). Words are stored [N/16, K/64 * 128]: for column tile
ct and slab s (64 rows), lane l = 4g + t (g < 8, t < 4) holds words 4l..4l+3, word p covering rows
k0 = 64s + 16t + 4p .. k0+3 of columns ca = 16ct + g and cb = ca + 8, nibble (ab + 2*(h // 2) + 4*(h % 2)) holding
row k0 + h of column (ca, cb)[ab]. Two masks then give each half2 register of the fragment in one LOP3. Scales
and zeros keep their [runs, N] shape with the columns of each 16-tile in pair order: position 2g + ab holds
column 8ab + g, so a thread reads its two columns' scales as one int32 and zeros as one int16.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
from torch import Tensor

SLOT = 16  # rows per field of a 16-word tile; also the K of one tensor-core step


def fields_per_word(bits: int) -> int:
    """Fields in one int32 word of `QWeight.qweight` (3-bit keeps its low 2 bits there, the high bit in qhigh)."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits={bits}: the kernels support 2, 3, 4, 8")
    return 16 if bits == 3 else 32 // bits


@dataclass(frozen=True)
class ChannelOrder:
    """The column order in which an act-order linear reads its input (`QWeight.input_order`: rows sorted by
    group), in both index forms. The kernel that produces the input writes it in this order, so the linear
    reads x contiguously: kernels that compute whole rows (RMSNorm, SiLU*up) gather through `sources`, kernels
    that compute some of the channels (the GEMV's SwiGLU finish, decode attention) scatter through
    `positions`. A gather re-reads a row that sits in L1; scattered 2-byte stores each cost a partial L2
    sector (RMSNorm of one row on an H100: 5.1 us scattering, 2.0 gathering; benchmarks/results/gpu.md)."""

    positions: Tensor  # int32 [K]: the column of input channel k
    sources: Tensor  # int32 [K]: the input channel at column j (the inverse of positions)

    def to(self, device) -> ChannelOrder:
        return ChannelOrder(self.positions.to(device), self.sources.to(device))


def place_channels(x: Tensor, order: ChannelOrder | None) -> Tensor:
    """x [..., K] with its channels in `order` (None: x itself): the reference of every producer's placement."""
    return x if order is None else x.index_select(-1, order.sources)


def place_halves(x: Tensor, order: ChannelOrder | None) -> Tensor:
    """A fused w13's output [..., 2I] with its gate and up halves each placed in `order` (an act-order w2's)."""
    return x if order is None else torch.cat([place_channels(half, order) for half in x.chunk(2, dim=-1)], dim=-1)


@dataclass(frozen=True)
class QWeight:
    """A GPTQ linear in the kernels' layout (see the module docstring). Kp = padded rows, G = groups."""

    qweight: Tensor  # int32 [Kp/F, N]: block b, word w, field j -> packed row 16*F*b + 16*j + w
    qhigh: Tensor | None  # int16 [Kp/16, N], 3-bit only: bit j of word 16b+w -> high bit of row 256b + 16j + w
    scales: Tensor  # fp16 [R, N], one row per run of 16*group_slots packed rows ("mma": columns in pair order)
    zeros: Tensor  # uint8 [R, N], true zero points (fp16 in the rare file whose zeros leave 0..255)
    slot_group: Tensor  # int32 [Kp/16]: group of each slot of 16 packed rows (for inspection and tests)
    perm: Tensor | None  # int32 [Kp]: input channel of each packed row, -1 = padding; None = identity
    locks: Tensor  # int32 [ceil(N/16)]: split-K tile counters, zero between launches (one stream at a time)
    bits: int
    in_features: int  # K
    group_slots: int  # aligned runs of this many slots share a group (a power of 2 dividing F): one s/z row
    tail_perm: bool  # perm[:K] is a permutation of 0..K-1 and only rows >= K pad: callers may gather x
    input_order: ChannelOrder | None = None  # when tail_perm and perm is not None: x's channels as rows sorted
    layout: str = "slots"  # or "mma" (see the module docstring)

    @property
    def out_features(self) -> int:
        return self.scales.shape[1]

    @property
    def slabs_per_run(self) -> int:
        """"mma" layout: slabs of 64 rows that share one scales/zeros row."""
        return self.group_slots // 4

    @property
    def padded_rows(self) -> int:
        return self.slot_group.shape[0] * SLOT

    def to(self, device) -> QWeight:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, **{f: move(getattr(self, f)) for f in
                                ("qweight", "qhigh", "scales", "zeros", "slot_group", "perm", "locks", "input_order")})

    def for_sorted_input(self) -> QWeight:
        """This weight for an x whose channels already come in `input_order`: the kernels then read x
        contiguously, as for a weight without act-order. The kernel that produces x (RMSNorm, SwiGLU,
        attention) places the channels, so act-order costs the linear no gather."""
        if self.input_order is None:
            raise ValueError("this weight reads x in input-channel order already (no input_order)")
        return replace(self, perm=None, input_order=None)


def _pack_fields(codes: Tensor, width: int, fields: int) -> Tensor:
    """codes int64 [Kp, N] -> int64 words [Kp/fields, N]: field j of word (b, w) = row fields*16*b + 16j + w."""
    kp, n = codes.shape
    c = codes.view(kp // (SLOT * fields), fields, SLOT, n)
    words = torch.zeros(c.shape[0], SLOT, n, dtype=torch.int64, device=codes.device)
    for j in range(fields):
        words |= c[:, j] << (width * j)
    return words.view(-1, n)


def _wrap(words: Tensor, dtype: torch.dtype) -> Tensor:
    """Reinterpret unsigned values held in int64 as the two's-complement `dtype`."""
    width = torch.iinfo(dtype).bits
    return torch.where(words >= 1 << (width - 1), words - (1 << width), words).to(dtype)


REPACK_ELEMENTS = 8 << 20  # int64 codes repack holds at once (64 MB): the load's transient memory


LAYOUTS = ("auto", "slots", "mma")


def _sorted_rows(order: Tensor, dest: Tensor, padded: Tensor, groups: int, kp: int,
                 fields: int) -> tuple[Tensor, Tensor, int]:
    """(src: the input channel of each of kp packed rows, -1 = padding; slot_group: the group of each slot of 16
    rows; group_slots: the longest aligned run of slots, a power of two up to `fields`, that shares a group)."""
    src = torch.full((kp,), -1, dtype=torch.int64, device=order.device)
    src[dest] = order
    slot_group = torch.full((kp // SLOT,), groups - 1, dtype=torch.int64, device=order.device)
    used = int(padded.sum()) // SLOT
    slot_group[:used] = torch.repeat_interleave(torch.arange(groups, device=order.device), padded // SLOT)
    group_slots = fields
    while group_slots > 1 and (slot_group.numel() % group_slots or not bool(
            (slot_group.view(-1, group_slots) == slot_group.view(-1, group_slots)[:, :1]).all())):
        group_slots //= 2
    return src, slot_group, group_slots


def repack(codes: Tensor, zeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int, layout: str = "auto") -> QWeight:
    """codes uint8 [K, N], TRUE zero points int [G, N], scales [G, N], g_idx int [K] -> QWeight.

    layout "auto" takes "mma" on CUDA where the weight allows it (`mma_unsupported`), else "slots";
    LOWBIT_MMA=0 asks for "slots". Whole 7B 4-bit model on an H100 (2026-12-07, benchmarks/results/gpu.md):
    decode at batch 1 519 against 460 tok/s, batch 4 1489 against 999, batch 16 4093 against 3170; but at batch 64
    5680 against 6430 (a 7B block of linears at 64 rows: 206 us against the slots layout's 167), so serving many
    rows at once may prefer LOWBIT_MMA=0."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}")
    fields = fields_per_word(bits)
    k, n = codes.shape
    dev = codes.device
    groups = scales.shape[0]
    g_idx = g_idx.to(device=dev, dtype=torch.int64)
    order = torch.sort(g_idx, stable=True).indices
    counts = torch.bincount(g_idx, minlength=groups)
    padded = (counts + SLOT - 1) // SLOT * SLOT
    start, pstart = torch.cumsum(counts, 0) - counts, torch.cumsum(padded, 0) - padded
    g_sorted = g_idx[order]
    dest = pstart[g_sorted] + torch.arange(k, device=dev) - start[g_sorted]
    total = int(padded.sum())
    zero_dtype = torch.uint8 if bool(((zeros >= 0) & (zeros <= 255)).all()) else torch.float16  # half the bytes
    zero_range = (int(zeros.min()), int(zeros.max())) if zeros.numel() else (0, 0)
    # "mma" pads nothing (whole 64-row slabs); "slots" pads to whole blocks of 16 * F rows
    kp = k if total == k and k % 64 == 0 and k else max(SLOT * fields, -(-total // (SLOT * fields)) * (SLOT * fields))
    src, slot_group, group_slots = _sorted_rows(order, dest, padded, groups, kp, fields)
    why_not = mma_unsupported(bits, k, kp, n, group_slots, zero_range)
    if layout == "mma" and why_not:
        raise ValueError(f"the mma layout does not take this weight: {why_not}")
    if layout == "auto":
        mma_on = os.environ.get("LOWBIT_MMA", "1") != "0"
        layout = "mma" if dev.type == "cuda" and mma_on and not why_not else "slots"
    block = SLOT * fields
    if layout == "slots" and kp % block:
        kp = -(-kp // block) * block
        src, slot_group, group_slots = _sorted_rows(order, dest, padded, groups, kp, fields)

    step = max(64, REPACK_ELEMENTS // kp)  # columns at a time: the int64 working copy stays ~64 MB (else 1 GB)
    qhigh = None
    if layout == "mma":
        qweight = torch.empty(n // 16, kp * 2, dtype=torch.int32, device=dev)
        step = -(-step // 16) * 16
    else:
        qweight = torch.empty(kp // fields, n, dtype=torch.int32, device=dev)
        qhigh = torch.empty(kp // SLOT, n, dtype=torch.int16, device=dev) if bits == 3 else None
    for c0 in range(0, n, step):
        rows = codes[:, c0:c0 + step].to(torch.int64)[src.clamp(min=0)]
        rows[src < 0] = 0
        if layout == "mma":
            qweight[c0 // 16:(c0 + rows.shape[1]) // 16] = _pack_mma(rows)
        elif bits == 3:
            qweight[:, c0:c0 + step] = _wrap(_pack_fields(rows & 3, 2, fields), torch.int32)
            qhigh[:, c0:c0 + step] = _wrap(_pack_fields(rows >> 2, 1, fields), torch.int16)
        else:
            qweight[:, c0:c0 + step] = _wrap(_pack_fields(rows, bits, fields), torch.int32)

    run_group = slot_group.view(-1, group_slots)[:, 0]
    identity = torch.arange(k, device=dev)
    tail = bool((src[k:] < 0).all()) and (src[:k].sort().values == identity).all().item()
    in_order = tail and bool((src[:k] == identity).all())
    columns = pair_columns if layout == "mma" else (lambda t: t)
    return QWeight(
        qweight=qweight, qhigh=qhigh,
        scales=columns(scales.to(device=dev, dtype=torch.float16)[run_group]).contiguous(),
        zeros=columns(zeros.to(device=dev, dtype=zero_dtype)[run_group]).contiguous(),
        slot_group=slot_group.to(torch.int32),
        perm=None if in_order else src.to(torch.int32),
        locks=torch.zeros(-(-n // 16), dtype=torch.int32, device=dev),
        bits=bits, in_features=k, group_slots=group_slots, tail_perm=tail,
        input_order=ChannelOrder(torch.argsort(src[:k]).to(torch.int32), src[:k].to(torch.int32))
        if tail and not in_order else None,
        layout=layout,
    )


def mma_unsupported(bits: int, k: int, kp: int, n: int, group_slots: int,
                    zero_range: tuple[int, int]) -> str | None:
    """Why the "mma" layout cannot hold a weight (None: it can). Its slabs are 64 rows, its column tiles 16, a
    slab sits in one group, rows are never padded (the kernel reads x without a mask), and the zero points
    (min, max) must lie in 0..63: the kernel reads them as bytes, and 1024 + 16 * zero must stay an exact fp16
    (it subtracts that from 1024 + 16 * code)."""
    if bits != 4:
        return f"{bits}-bit (the mma layout is 4-bit)"
    if kp != k or k % 64:
        return f"{k} input rows do not fill whole 64-row slabs without padding"
    if n % 16:
        return f"{n} output columns are not a multiple of 16"
    if group_slots < 4:
        return "groups shorter than 64 rows"
    low, high = zero_range
    if low < 0 or high > 63:
        return f"a zero point of {low if low < 0 else high} (the mma layout takes 0 to 63)"
    return None


def _pack_mma(rows: Tensor) -> Tensor:
    """codes int64 [K, n] in packed row order (n a multiple of 16) -> int32 words [n/16, 2K] of the "mma" layout."""
    k, n = rows.shape
    c = rows.view(k // 64, 4, 4, 4, n // 16, 2, 8).permute(4, 0, 6, 1, 2, 3, 5)  # ct, slab, g, t, p, h, ab
    words = torch.zeros(c.shape[:5], dtype=torch.int64, device=rows.device)
    for h in range(4):
        for ab in range(2):
            words |= c[..., h, ab] << (4 * mma_nibble(h, ab))
    return _wrap(words.reshape(n // 16, -1), torch.int32)


def mma_nibble(h: int, ab: int) -> int:
    """The nibble of an "mma" word that holds row k0 + h of column (ca, cb)[ab]."""
    return ab + 2 * (h // 2) + 4 * (h % 2)


def pair_columns(t: Tensor) -> Tensor:
    """[R, N] -> the "mma" column order: in each 16-tile, position 2g + ab holds column 8ab + g."""
    r, n = t.shape
    return t.reshape(r, n // 16, 2, 8).transpose(2, 3).reshape(r, n)


def unpair_columns(t: Tensor) -> Tensor:
    """The inverse of `pair_columns`."""
    r, n = t.shape
    return t.reshape(r, n // 16, 8, 2).transpose(2, 3).reshape(r, n)


