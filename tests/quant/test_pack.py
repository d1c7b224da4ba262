"""lowbit.quant.pack against a naive, independent reference of the GPTQ format.

The reference below is a deliberately plain transcription, in Python integers, of GPTQ-for-LLaMa's /
AutoGPTQ's pack loop (32 values -> `bits` words; for 3 bits the hand-placed values 10 and 21) and of
AutoGPTQ's unpacking (shift, mask, the two 3-bit straddle cases, zeros + 1 for v1). lowbit uses a generic
bit-stream view instead; these tests check that both agree bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.errors import FormatError
from lowbit.quant.pack import (
    FORMATS,
    SUPPORTED_BITS,
    GPTQTensors,
    default_g_idx,
    dequantize,
    num_groups,
    pack,
    pack_cols,
    pack_rows,
    unpack,
    unpack_cols,
    unpack_rows,
    v1_zero_overflow,
    validate,
)

MASK32 = 0xFFFFFFFF


# ----------------------------------------------------------------------------- naive reference

def ref_pack_words(values: list[int], bits: int) -> list[int]:
    """GPTQ-for-LLaMa's pack loop for one run of values (length a multiple of 32) -> uint32 words.

    Values are Python ints and may be -1 (AutoGPTQ's `zeros - 1` for a zero point of 0): like its uint32
    numpy arithmetic, the shifted all-ones then spills over every higher field of the word.
    """
    words = []
    for start in range(0, len(values), 32):
        v = values[start:start + 32]
        if bits != 3:
            per = 32 // bits
            for w in range(bits):
                word = 0
                for m in range(per):
                    word |= v[w * per + m] << (bits * m)
                words.append(word & MASK32)
            continue
        a = b = c = 0
        for m in range(10):
            a |= v[m] << (3 * m)
        a |= v[10] << 30  # low two bits of value 10 end word a
        b |= (v[10] >> 2) & 1  # its top bit starts word b
        for m in range(10):
            b |= v[11 + m] << (3 * m + 1)
        b |= v[21] << 31  # low bit of value 21 ends word b
        c |= (v[21] >> 1) & 3  # its top two bits start word c
        for m in range(10):
            c |= v[22 + m] << (3 * m + 2)
        words += [a & MASK32, b & MASK32, c & MASK32]
    return words


def ref_read(words: list[int], bits: int, j: int) -> int:
    """Value j of a packed run, the way AutoGPTQ's torch path unpacks it (words as uint32 ints)."""
    if bits != 3:
        per = 32 // bits
        return (words[j // per] >> (bits * (j % per))) & ((1 << bits) - 1)
    run, m = divmod(j, 32)
    a, b, c = words[3 * run:3 * run + 3]
    if m < 10:
        return (a >> (3 * m)) & 7
    if m == 10:
        return ((a >> 30) & 3) | ((b << 2) & 4)
    if m < 21:
        return (b >> (3 * (m - 11) + 1)) & 7
    if m == 21:
        return ((b >> 31) & 1) | ((c << 1) & 6)
    return (c >> (3 * (m - 22) + 2)) & 7


def padded(values: list[int], fill: int = 0) -> list[int]:
    return values + [fill] * (-len(values) % 32)


def to_int32(words: list[int]) -> np.ndarray:
    return np.array(words, dtype=np.uint32).view(np.int32)


def ref_qweight(codes: np.ndarray, bits: int) -> torch.Tensor:
    """codes [K, N] -> qweight, one input column at a time (K padded with zero codes to a multiple of 32)."""
    cols = [to_int32(ref_pack_words(padded(codes[:, n].tolist()), bits)) for n in range(codes.shape[1])]
    return torch.from_numpy(np.stack(cols, axis=1))


def ref_qzeros(stored: np.ndarray, bits: int) -> torch.Tensor:
    """stored zero fields [G, N] (v1: z - 1, possibly -1; v2: z) -> qzeros, one group row at a time."""
    rows = [to_int32(ref_pack_words(padded(stored[g].tolist()), bits)) for g in range(stored.shape[0])]
    return torch.from_numpy(np.stack(rows, axis=0))


def uint_words(t: torch.Tensor) -> np.ndarray:
    return t.numpy().view(np.uint32).astype(np.int64)


def ref_codes_and_zeros(t: GPTQTensors, bits: int, fmt: str, k: int, n: int):
    """Decode every value with ref_read; v1 zeros are masked fields + 1 (AutoGPTQ, ExLlama, vLLM)."""
    qw, qz = uint_words(t.qweight), uint_words(t.qzeros)
    q = np.array([[ref_read(qw[:, c].tolist(), bits, r) for c in range(n)] for r in range(k)], dtype=np.int64)
    z = np.array([[ref_read(qz[g].tolist(), bits, c) for c in range(n)] for g in range(qz.shape[0])], dtype=np.int64)
    return q, z + (1 if fmt == "gptq" else 0)


def ref_dequant(t: GPTQTensors, bits: int, fmt: str, k: int, n: int) -> torch.Tensor:
    """W [N, K] in float32, one input column at a time: W[:, k] = s[g] * (q[k] - z[g])."""
    q, z = ref_codes_and_zeros(t, bits, fmt, k, n)
    s, g_idx = t.scales.float().numpy(), t.g_idx.tolist()
    W = np.zeros((n, k), dtype=np.float32)
    for col in range(k):
        g = g_idx[col]
        W[:, col] = s[g] * (q[col] - z[g]).astype(np.float32)
    return torch.from_numpy(W)


# ----------------------------------------------------------------------------- fixtures

def layer(bits: int, k: int, n: int, group_size: int, act_order: bool, sym: bool, fmt: str, seed: int = 0):
    """Random true codes/zeros/scales/g_idx as a quantizer would produce them."""
    gen = torch.Generator().manual_seed(seed)
    groups = num_groups(k, group_size)
    codes = torch.randint(0, 1 << bits, (k, n), generator=gen, dtype=torch.int32)
    if sym:
        zeros = torch.full((groups, n), 1 << (bits - 1), dtype=torch.int32)
    else:
        low = 1 if fmt == "gptq" else 0  # zero 0 is v1's overflow case, tested on its own
        zeros = torch.randint(low, 1 << bits, (groups, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 1e-3).half()
    g_idx = default_g_idx(k, group_size)
    if act_order:  # GPTQ quantizes columns in order perm, so column perm[i] lands in group i // group_size
        perm = torch.randperm(k, generator=gen)
        g_idx = g_idx[torch.argsort(perm)]
    return codes, zeros, scales, g_idx


SHAPES = [(256, -1), (256, 32), (256, 64), (256, 128), (576, 128), (96, 64), (100, 32)]


# ----------------------------------------------------------------------------- packing, bit for bit

@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("k,n", [(64, 32), (96, 40), (100, 7)])
def test_pack_rows_and_cols_match_reference_loop(bits, k, n):
    gen = torch.Generator().manual_seed(bits * 1000 + k)
    codes = torch.randint(0, 1 << bits, (k, n), generator=gen, dtype=torch.int32)
    qweight = pack_rows(codes, bits)
    assert qweight.dtype == torch.int32 and qweight.shape == (-(-k // 32) * bits, n)
    assert torch.equal(qweight, ref_qweight(codes.numpy(), bits))
    qzeros = pack_cols(codes.t(), bits)  # the same values laid out as [G=n, k] zero fields
    assert qzeros.shape == (n, -(-k // 32) * bits)
    assert torch.equal(qzeros, ref_qzeros(codes.t().numpy(), bits))


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_unpack_reads_arbitrary_words_like_reference(bits):
    """Any int32 words, negative ones included: arithmetic shifts must not leak sign bits."""
    gen = torch.Generator().manual_seed(bits)
    words = torch.randint(-(1 << 31), 1 << 31, (3 * bits, 5), generator=gen, dtype=torch.int64).to(torch.int32)
    k = 3 * 32
    got = unpack_rows(words, bits, k)
    u = uint_words(words)
    want = [[ref_read(u[:, c].tolist(), bits, r) for c in range(5)] for r in range(k)]
    assert got.dtype == torch.uint8
    assert got.tolist() == want
    assert unpack_cols(words.t().contiguous(), bits, k).t().tolist() == want


def test_3bit_straddling_values_10_and_21():
    codes = torch.zeros(32, 1, dtype=torch.int32)
    codes[10], codes[21] = 0b101, 0b011
    a, b, c = pack_rows(codes, 3)[:, 0].tolist()
    assert (a & MASK32) == 0b01 << 30 and b == (0b1 | (0b1 << 31)) - (1 << 32) and c == 0b01
    assert unpack_rows(pack_rows(codes, 3), 3, 32).flatten().tolist() == codes.flatten().tolist()


def test_sign_bit_words():
    codes = torch.full((32, 3), 15, dtype=torch.int32)
    assert pack_rows(codes, 4).unique().tolist() == [-1]
    assert unpack_rows(pack_rows(codes, 4), 4, 32).unique().tolist() == [15]


def test_pack_rows_rejects_out_of_range_codes():
    with pytest.raises(FormatError, match="outside 4-bit"):
        pack_rows(torch.tensor([[16]]), 4)


def test_round_trip_at_llama_mlp_size():
    codes = torch.randint(0, 16, (4096, 11008), dtype=torch.uint8)
    assert torch.equal(unpack_rows(pack_rows(codes, 4), 4, 4096), codes)


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("act_order", [False, True], ids=["static", "actorder"])
@pytest.mark.parametrize("k,group_size", SHAPES)
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_round_trip(bits, k, group_size, act_order, sym, fmt):
    n = 40  # not a multiple of 32: qzeros carries padding fields
    codes, zeros, scales, g_idx = layer(bits, k, n, group_size, act_order, sym, fmt, seed=bits + k)
    bias = torch.randn(n).half()
    t = pack(codes, zeros, scales, g_idx, bits, fmt, bias=bias)
    validate(t, bits, group_size, k, n)
    assert (t.in_features, t.out_features) == (k, n)

    codes2, zeros2, scales2, g_idx2 = unpack(t, bits, fmt, k)
    assert torch.equal(codes2.to(torch.int32), codes)
    assert torch.equal(zeros2, zeros)
    assert torch.equal(scales2, scales) and torch.equal(g_idx2, g_idx) and torch.equal(t.bias, bias)

    want = ref_dequant(t, bits, fmt, k, n)
    torch.testing.assert_close(dequantize(t, bits, fmt, k, dtype=torch.float32), want, rtol=0, atol=0)
    W16 = dequantize(t, bits, fmt)
    assert W16.dtype == torch.float16 and W16.shape == (n, k) and W16.is_contiguous()
    torch.testing.assert_close(W16, want.half(), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_packed_layer_matches_reference_words(bits, fmt):
    k, n, group_size = 128, 64, 32
    codes, zeros, scales, g_idx = layer(bits, k, n, group_size, True, False, fmt)
    t = pack(codes, zeros, scales, g_idx, bits, fmt)
    stored = zeros.numpy() - (1 if fmt == "gptq" else 0)
    assert torch.equal(t.qweight, ref_qweight(codes.numpy(), bits))
    assert torch.equal(t.qzeros, ref_qzeros(stored, bits))
    assert t.qweight.shape == (k * bits // 32, n) and t.qzeros.shape == (k // group_size, n * bits // 32)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_dequantize_matches_per_element_reference(bits, fmt):
    k, n = 64, 9
    codes, zeros, scales, g_idx = layer(bits, k, n, 16, True, False, fmt, seed=7)
    t = pack(codes, zeros, scales, g_idx, bits, fmt)
    qw, qz, s = uint_words(t.qweight), uint_words(t.qzeros), t.scales.float().numpy()
    W = dequantize(t, bits, fmt, dtype=torch.float32)
    for row in range(n):
        for col in range(k):
            g = int(t.g_idx[col])
            q = ref_read(qw[:, row].tolist(), bits, col)
            z = ref_read(qz[g].tolist(), bits, row) + (1 if fmt == "gptq" else 0)
            assert W[row, col].item() == np.float32(s[g, row]) * np.float32(q - z)


def test_readers_accept_minimal_word_counts():
    """ceil(count*bits/32) words (no padding to 32 values) hold enough values and must read the same."""
    bits, k, n, group_size = 3, 100, 40, 32
    codes, zeros, scales, g_idx = layer(bits, k, n, group_size, False, False, "gptq_v2")
    t = pack(codes, zeros, scales, g_idx, bits, "gptq_v2")
    short = GPTQTensors(t.qweight[:-(-k * bits // 32)], t.qzeros[:, :-(-n * bits // 32)], t.scales, t.g_idx)
    assert short.qweight.shape[0] < t.qweight.shape[0] and short.qzeros.shape[1] < t.qzeros.shape[1]
    validate(short, bits, group_size, k, n)
    assert torch.equal(dequantize(short, bits, "gptq_v2"), dequantize(t, bits, "gptq_v2"))


# ----------------------------------------------------------------------------- v1 zero points

def test_sym_zero_is_half_range_and_v1_stores_one_less():
    zeros = torch.full((1, 32), 8, dtype=torch.int32)
    t = pack(torch.zeros(32, 32, dtype=torch.int32), zeros, torch.ones(1, 32).half(), default_g_idx(32, -1), 4, "gptq")
    assert t.qzeros.unique().tolist() == [0x77777777]  # 7 in every field
    assert torch.equal(unpack(t, 4, "gptq")[1], zeros)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_v1_zero_overflow_detected_and_refused(bits):
    zeros = torch.full((2, 32), 1, dtype=torch.int32)
    assert not v1_zero_overflow(zeros, bits)
    assert not v1_zero_overflow(torch.full((1, 4), 1 << bits), bits)  # z = 2^bits is stored as 2^bits - 1
    zeros[1, 5] = 0
    assert v1_zero_overflow(zeros, bits)
    args = (torch.zeros(32, 32, dtype=torch.int32), zeros, torch.ones(2, 32).half(), default_g_idx(32, 16), bits)
    with pytest.raises(FormatError, match="gptq_v2"):
        pack(*args, "gptq")
    assert torch.equal(unpack(pack(*args, "gptq_v2"), bits, "gptq_v2")[1], zeros)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_v1_reader_on_overflowed_autogptq_file_matches_reference_readers(bits):
    """AutoGPTQ writes zero 0 as (0 - 1) cast to uint32: all ones from that field to the word's top bit.

    Its readers (torch path, CUDA), ExLlama v1/v2 and vLLM mask each field and add 1, so every field
    hit reads 2^bits. lowbit must compute the same weights for such a file.
    """
    k, n, group_size = 64, 64, 32
    codes, zeros, scales, g_idx = layer(bits, k, n, group_size, True, False, "gptq", seed=3)
    zeros[0, 3] = 0
    zeros[1, 40] = 0
    written = GPTQTensors(ref_qweight(codes.numpy(), bits), ref_qzeros(zeros.numpy() - 1, bits), scales, g_idx)
    validate(written, bits, group_size, k, n)

    _, z_read, _, _ = unpack(written, bits, "gptq")
    _, z_ref = ref_codes_and_zeros(written, bits, "gptq", k, n)
    assert torch.equal(z_read, torch.from_numpy(z_ref).to(torch.int32))
    assert z_read[0, 3] == 1 << bits and z_read[1, 40] == 1 << bits
    assert (z_read == 1 << bits).sum() > 2  # the all-ones spill reached neighbouring fields too
    torch.testing.assert_close(dequantize(written, bits, "gptq", dtype=torch.float32),
                               ref_dequant(written, bits, "gptq", k, n), rtol=0, atol=0)


def test_v1_overflow_spills_into_higher_fields_of_autogptq_word():
    zeros = torch.full((1, 32), 5, dtype=torch.int32)
    zeros[0, 2] = 0  # field 2 of the first word: fields 2..7 of that word become all ones
    words = ref_qzeros(zeros.numpy() - 1, 4)
    got = unpack_cols(words, 4, 32)[0].tolist()
    assert got[:2] == [4, 4] and got[2:8] == [15] * 6 and got[8:] == [4] * 24


# ----------------------------------------------------------------------------- groups and validation

def test_groups_and_default_g_idx():
    assert num_groups(576, 128) == 5 and num_groups(96, 64) == 2 and num_groups(4096, -1) == 1
    assert default_g_idx(6, 4).tolist() == [0, 0, 0, 0, 1, 1] and default_g_idx(6, 4).dtype == torch.int32
    assert default_g_idx(5, -1).tolist() == [0] * 5
    with pytest.raises(FormatError, match="group_size=0"):
        num_groups(64, 0)


@pytest.fixture
def good():
    codes, zeros, scales, g_idx = layer(4, 576, 576, 128, False, True, "gptq")
    return pack(codes, zeros, scales, g_idx, 4, "gptq")


def _with(t: GPTQTensors, **changes) -> GPTQTensors:
    return GPTQTensors(**{**t.__dict__, **changes})


@pytest.mark.parametrize("change,bits,message", [
    ({}, 5, "unsupported GPTQ bits=5; lowbit reads 2, 3, 4, 8"),
    ({"qweight": torch.zeros(64, 576, dtype=torch.int32)}, 4,
     "qweight has shape (64, 576) but 4-bit in_features=576, out_features=576 needs (72, 576)"),
    ({"scales": torch.zeros(4, 576).half()}, 4, "scales has shape (4, 576) but 4-bit in_features=576"),
    ({"qzeros": torch.zeros(4, 72, dtype=torch.int32)}, 4, "qzeros has shape (4, 72)"),
    ({"qzeros": torch.zeros(5, 72, dtype=torch.int64)}, 4, "qzeros has dtype torch.int64, GPTQ stores int32"),
    ({"g_idx": torch.full((576,), 5, dtype=torch.int32)}, 4, "g_idx spans [5, 5] but there are 5 groups"),
    ({"g_idx": torch.zeros(575, dtype=torch.int32)}, 4, "g_idx has shape (575,)"),
    ({"bias": torch.zeros(575)}, 4, "bias has shape (575,)"),
])
def test_validate_names_the_mismatch_in_one_line(good, change, bits, message):
    validate(good, 4, 128, 576, 576)
    with pytest.raises(FormatError) as err:
        validate(_with(good, **change), bits, 128, 576, 576)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_format_is_refused(good):
    with pytest.raises(FormatError, match="checkpoint_format 'gptq_v3'"):
        dequantize(good, 4, "gptq_v3")
