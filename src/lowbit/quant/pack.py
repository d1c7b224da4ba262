"""The GPTQ on-disk tensor format: the one place that knows how qweight, qzeros, scales and g_idx are laid out.

Owns bit packing (2/3/4/8-bit codes in int32 words), the two zero-point conventions ("gptq" v1 and
"gptq_v2"), shape validation and the reference dequantization. Pure tensor functions: reading files,
choosing codes (the quantizer) and fast matmuls (the kernels) live elsewhere.

A linear with in_features K, out_features N and G groups is stored as

    qweight int32 [ceil(K/32)*bits, N]   codes, packed along K (dim 0)
    qzeros  int32 [G, ceil(N/32)*bits]   stored zero points, packed along N (dim 1)
    scales  fp16  [G, N]
    g_idx   int32 [K]                    group of each input row (non-monotonic under act-order)
    bias    fp16  [N], optional

with G = ceil(K / group_size), or 1 for group_size -1, and W[n, k] = scales[g, n] * (q[k, n] - z[g, n]),
g = g_idx[k]. Along the packed axis the words form one little-endian bit stream: value j occupies bits
bits*j .. bits*j + bits - 1, so 32 values fill exactly `bits` words and, for 3 bits, values 10 and 21 of
every 32 straddle two words (GPTQ-for-LLaMa's pack loop). We write runs padded with zero bits to a
multiple of 32 values (AutoGPTQ's shapes whenever K and N are multiples of 32) and read any word count
that holds enough values.

Zero points: "gptq_v2" (GPTQModel) stores z itself. "gptq" (v1: AutoGPTQ, GPTQ-for-LLaMa, ExLlama, TGI,
vLLM) stores (z - 1) masked to `bits`, and readers add 1 back per field, so v1 holds z in [1, 2^bits]
and cannot hold z = 0, which asymmetric quantization produces for groups with no negative weight.
Such a file holds all ones in that field (AutoGPTQ's uint32 packer also sets every higher field of the
word) and we read each such field as 2^bits, as AutoGPTQ's torch path, ExLlamaV2 (TGI's 4-bit path) and
vLLM's gptq kernel do: mask the field, add 1. Two readers differ and are not reproduced: the Triton
kernels (GPTQ-for-LLaMa, AutoGPTQ, TGI 2/8-bit) compute ((stored & mask) + 1) & mask = 0, and GPTQModel
converts v1 to v2 by adding 1 to whole words, so a carry runs into the next field. `pack` refuses to
write a zero the format cannot hold; `v1_zero_overflow` lets the quantizer pick "gptq_v2" beforehand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.errors import FormatError

SUPPORTED_BITS = (2, 3, 4, 8)
FORMATS = ("gptq", "gptq_v2")
_WORD = 32  # bits per storage word; every layout here packs into int32


@dataclass(frozen=True)
class GPTQTensors:
    """One GPTQ linear layer as stored on disk (shapes in the module docstring)."""

    qweight: Tensor
    qzeros: Tensor
    scales: Tensor
    g_idx: Tensor
    bias: Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.g_idx.shape[0]

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise FormatError(f"unsupported GPTQ bits={bits}; lowbit reads 2, 3, 4, 8")


def _check_fmt(fmt: str) -> None:
    if fmt not in FORMATS:
        raise FormatError(f"unknown GPTQ checkpoint_format {fmt!r}; lowbit reads 'gptq', 'gptq_v2'")


def _slots(bits: int) -> list[tuple[int, int]]:
    """(word, bit offset) of value j = 0..31 in a run of 32 values, which fills exactly `bits` words."""
    return [divmod(bits * j, _WORD) for j in range(_WORD)]


def _word_counts(count: int, bits: int) -> tuple[int, int]:
    """Fewest words holding `count` values, and the padded count we write: (ceil(c*b/32), ceil(c/32)*b)."""
    return -(-count * bits // _WORD), -(-count // _WORD) * bits


def packed_words(count: int, bits: int) -> int:
    """How many int32 words we write for `count` values (padded to a multiple of 32 values)."""
    return _word_counts(count, bits)[1]


def pack_rows(codes: Tensor, bits: int) -> Tensor:
    """Codes int [K, N] in [0, 2^bits) -> int32 [ceil(K/32)*bits, N], packed along dim 0."""
    _check_bits(bits)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        lo, hi = int(codes.min()), int(codes.max())
        raise FormatError(f"codes span [{lo}, {hi}], outside {bits}-bit [0, {(1 << bits) - 1}]")
    k, n = codes.shape
    runs = -(-k // _WORD)
    v = torch.zeros(runs * _WORD, n, dtype=torch.int32, device=codes.device)
    v[:k] = codes
    v = v.view(runs, _WORD, n)
    words = torch.zeros(runs, bits, n, dtype=torch.int32, device=codes.device)
    for j, (w, o) in enumerate(_slots(bits)):
        words[:, w] |= v[:, j] << o  # int32 shifts wrap: bits past 31 fall off here...
        if o + bits > _WORD:
            words[:, w + 1] |= v[:, j] >> (_WORD - o)  # ...and land in the next word
    return words.view(runs * bits, n)


def unpack_rows(packed: Tensor, bits: int, k: int) -> Tensor:
    """int32 [words, N] packed along dim 0 -> uint8 codes [k, N]; any word count holding k values."""
    _check_bits(bits)
    rows, n = packed.shape
    if rows * _WORD < k * bits:
        raise FormatError(f"{rows} packed words hold {rows * _WORD // bits} {bits}-bit values, need {k}")
    runs = -(-rows // bits)
    if rows != runs * bits:
        packed = torch.cat([packed, packed.new_zeros(runs * bits - rows, n)])
    words = packed.reshape(runs, bits, n)
    out = torch.empty(runs, _WORD, n, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    for j, (w, o) in enumerate(_slots(bits)):
        x = words[:, w] >> o  # arithmetic shift: sign copies land above the field and are masked off
        if o + bits > _WORD:
            x = (x & ((1 << (_WORD - o)) - 1)) | (words[:, w + 1] << (_WORD - o))
        out[:, j] = x & mask
    return out.view(runs * _WORD, n)[:k]


def pack_cols(codes: Tensor, bits: int) -> Tensor:
    """Codes int [G, N] -> int32 [G, ceil(N/32)*bits], packed along dim 1 (the qzeros layout)."""
    return pack_rows(codes.t(), bits).t().contiguous()


def unpack_cols(packed: Tensor, bits: int, n: int) -> Tensor:
    """int32 [G, words] packed along dim 1 -> uint8 codes [G, n]."""
    return unpack_rows(packed.t(), bits, n).t()


def num_groups(k: int, group_size: int) -> int:
    """G for in_features k: ceil(k / group_size), or 1 for group_size -1 (one group per column)."""
    if group_size == -1:
        return 1
    if group_size <= 0:
        raise FormatError(f"group_size={group_size} must be positive or -1")
    return math.ceil(k / group_size)


def default_g_idx(k: int, group_size: int) -> Tensor:
    """The g_idx of files without one (no act-order): arange(k) // group_size, all zeros for -1."""
    num_groups(k, group_size)  # rejects group sizes other than -1 and positive ones
    step = max(k, 1) if group_size == -1 else group_size
    return torch.arange(k, dtype=torch.int32) // step


def v1_zero_overflow(zeros: Tensor, bits: int) -> bool:
    """True if some true zero point lies outside [1, 2^bits], the range "gptq" (v1) can store (z = 0 does)."""
    _check_bits(bits)
    return bool(((zeros < 1) | (zeros > 1 << bits)).any())


def _zero_range(bits: int, fmt: str) -> tuple[int, int]:
    return (1, 1 << bits) if fmt == "gptq" else (0, (1 << bits) - 1)


def pack(codes: Tensor, zeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int, fmt: str,
         bias: Tensor | None = None) -> GPTQTensors:
    """codes int [K, N] (the on-disk orientation, i.e. the transposed nn.Linear weight), true zero
    points int [G, N], scales [G, N], g_idx [K] -> the tensors a GPTQ checkpoint holds, for `fmt`.
    Scales and bias are stored in float16, as every GPTQ tool writes them."""
    _check_bits(bits)
    _check_fmt(fmt)
    lo, hi = _zero_range(bits, fmt)
    if zeros.numel() and (int(zeros.min()) < lo or int(zeros.max()) > hi):
        hint = "; write 'gptq_v2' to keep zero points of 0" if fmt == "gptq" else ""
        raise FormatError(f"zero points span [{int(zeros.min())}, {int(zeros.max())}] but {bits}-bit "
                          f"checkpoint_format {fmt!r} stores [{lo}, {hi}]{hint}")
    stored = zeros.to(torch.int32) - lo  # v1 stores z - 1, v2 stores z
    return GPTQTensors(
        qweight=pack_rows(codes, bits),
        qzeros=pack_cols(stored, bits),
        scales=scales.to(torch.float16),
        g_idx=g_idx.to(torch.int32),
        bias=None if bias is None else bias.to(torch.float16),
    )


def unpack(t: GPTQTensors, bits: int, fmt: str, in_features: int | None = None
           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (codes uint8 [K, N], true zero points int32 [G, N], scales [G, N], g_idx [K])."""
    _check_fmt(fmt)
    k = t.in_features if in_features is None else in_features
    codes = unpack_rows(t.qweight, bits, k)
    zeros = unpack_cols(t.qzeros, bits, t.scales.shape[1]).to(torch.int32)
    if fmt == "gptq":
        zeros += 1  # per field, as AutoGPTQ/ExLlama/vLLM do: a stored 2^bits - 1 reads as 2^bits
    return codes, zeros, t.scales, t.g_idx


def dequantize(t: GPTQTensors, bits: int, fmt: str, in_features: int | None = None,
               dtype: torch.dtype | None = None) -> Tensor:
    """The float weight [N, K] (nn.Linear orientation), in `dtype` or the scales' float dtype.

    W = (q - z[g_idx]) * s[g_idx]: the difference of small integers is exact in any float dtype, so the
    product is rounded once. Built in the stored [K, N] order (row gathers), transposed once at the end.
    """
    codes, zeros, scales, g_idx = unpack(t, bits, fmt, in_features)
    dtype = dtype or (scales.dtype if scales.is_floating_point() else torch.float32)
    g = g_idx.long()
    W = codes.to(dtype)
    W.sub_(zeros.to(dtype).index_select(0, g))
    W.mul_(scales.to(dtype).index_select(0, g))
    return W.t().contiguous()


def _shape_error(name: str, actual, needed: str, bits: int, k: int, n: int) -> FormatError:
    return FormatError(f"{name} has shape {tuple(actual)} but {bits}-bit in_features={k}, "
                       f"out_features={n} needs {needed}")


def validate(t: GPTQTensors, bits: int, group_size: int, in_features: int, out_features: int) -> None:
    """Raise FormatError, in one line naming the mismatch, unless `t` is a consistent GPTQ layer."""
    _check_bits(bits)
    k, n, groups = in_features, out_features, num_groups(in_features, group_size)
    for name in ("qweight", "qzeros"):
        if getattr(t, name).dtype != torch.int32:
            raise FormatError(f"{name} has dtype {getattr(t, name).dtype}, GPTQ stores int32")
    lo, hi = _word_counts(k, bits)
    if t.qweight.dim() != 2 or not lo <= t.qweight.shape[0] <= hi or t.qweight.shape[1] != n:
        raise _shape_error("qweight", t.qweight.shape, f"({hi}, {n})", bits, k, n)
    if tuple(t.scales.shape) != (groups, n):
        raise _shape_error("scales", t.scales.shape, f"({groups}, {n}) for group_size={group_size}", bits, k, n)
    if not t.scales.is_floating_point():
        raise FormatError(f"scales has dtype {t.scales.dtype}, GPTQ stores float16")
    lo, hi = _word_counts(n, bits)
    if t.qzeros.dim() != 2 or t.qzeros.shape[0] != groups or not lo <= t.qzeros.shape[1] <= hi:
        raise _shape_error("qzeros", t.qzeros.shape, f"({groups}, {hi}) for group_size={group_size}", bits, k, n)
    if tuple(t.g_idx.shape) != (k,):
        raise _shape_error("g_idx", t.g_idx.shape, f"({k},)", bits, k, n)
    if k and (int(t.g_idx.min()) < 0 or int(t.g_idx.max()) >= groups):
        raise FormatError(f"g_idx spans [{int(t.g_idx.min())}, {int(t.g_idx.max())}] but there are "
                          f"{groups} groups (in_features={k}, group_size={group_size})")
    if t.bias is not None and tuple(t.bias.shape) != (n,):
        raise _shape_error("bias", t.bias.shape, f"({n},)", bits, k, n)
