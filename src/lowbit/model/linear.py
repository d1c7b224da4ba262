"""Linear layers for GPTQ-packed weights: `QuantLinear` and the rules for fusing several into one.

QuantLinear keeps the checkpoint's tensors (qweight/qzeros/scales/g_idx) as buffers, and its backends
declare what they support, so the loader picks one from those declarations (`pick_backend`). The torch
reference (dequantize group-wise, then matmul) runs on any device; "triton" repacks once into the layout of
`lowbit.kernels.qmatmul` and runs its kernels. The format itself lives in `lowbit.quant.pack`.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.config import QuantConfig
from lowbit.kernels import ops
from lowbit.kernels.layout import place_halves
from lowbit.quant import pack


@dataclass(frozen=True)
class Backend:
    """What one way of computing a QuantLinear supports (GPTQModel-style declarations)."""

    name: str
    devices: tuple[str, ...]
    bits: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    needs: str | None = None  # a module that must be importable

    def supports(self, quant: QuantConfig, device: torch.device, dtype: torch.dtype) -> bool:
        return (device.type in self.devices and quant.bits in self.bits and dtype in self.dtypes
                and (self.needs is None or importlib.util.find_spec(self.needs) is not None))


_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
# In order of preference; every backend handles act-order, asymmetric zeros, v1/v2 and any group size.
BACKENDS = (
    Backend("triton", ("cuda",), (2, 3, 4, 8), _FLOATS, needs="triton"),
    Backend("dense", ("cpu", "cuda"), pack.SUPPORTED_BITS, _FLOATS),
    Backend("reference", ("cpu", "cuda"), pack.SUPPORTED_BITS, _FLOATS),
)
BACKEND_NAMES = tuple(b.name for b in BACKENDS)


def pick_backend(quant: QuantConfig, device: torch.device, dtype: torch.dtype, dense_fits: bool) -> str:
    """The first declared backend that supports this layer; "dense" only where its float copy fits."""
    for b in BACKENDS:
        if b.supports(quant, device, dtype) and (b.name != "dense" or (dense_fits and device.type == "cpu")):
            return b.name
    return "reference"


class QuantLinear(nn.Module):
    """y = x @ dequantize(W).T + b for one GPTQ-packed weight.

    Backends: "reference" dequantizes on every call (least memory, any device); "dense" keeps the
    dequantized weight in the compute dtype (CPU speed at float memory cost); "triton" keeps the weight
    repacked for `lowbit.kernels.qmatmul` (CUDA; q/k/v and gate/up fused by the loader run as one launch,
    act-order rows sorted by group at repack). The checkpoint's tensors stay the source of truth; with
    "triton" they move to host memory, so the GPU holds one copy of the weight.
    """

    SUPPORTS_BITS = pack.SUPPORTED_BITS
    SUPPORTS_FORMATS = pack.FORMATS
    SUPPORTS_DESC_ACT = True
    SUPPORTS_ASYM = True
    SUPPORTS_DEVICES = ("cpu", "cuda")

    def __init__(self, in_features: int, out_features: int, bias: bool, quant: QuantConfig):
        super().__init__()
        self.in_features, self.out_features, self.quant = in_features, out_features, quant
        bits, groups = quant.bits, pack.num_groups(in_features, quant.group_size)
        self.register_buffer("qweight", torch.empty(pack.packed_words(in_features, bits), out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.empty(groups, pack.packed_words(out_features, bits), dtype=torch.int32))
        self.register_buffer("scales", torch.empty(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32))
        self.register_buffer("bias", torch.empty(out_features, dtype=torch.float16) if bias else None)
        self.backend = "reference"
        self.dense_weight: Tensor | None = None
        self.kernel_weight = None  # lowbit.kernels.qmatmul.QWeight for the "triton" backend
        self._sorted_input_weight = None  # kernel_weight.for_sorted_input(): for inputs already in input_order

    def use_backend(self, backend: str, dtype: torch.dtype) -> None:
        """Switch how forward computes; called once after the weights are loaded."""
        if backend not in BACKEND_NAMES:
            raise ValueError(f"unknown QuantLinear backend {backend!r}; one of {', '.join(BACKEND_NAMES)}")
        if self.kernel_weight is not None:  # back from "triton": the checkpoint tensors return to the device
            self._move_checkpoint(self.kernel_weight.qweight.device)
            self.kernel_weight = self._sorted_input_weight = None
        self.dense_weight = self.dequantize(dtype) if backend == "dense" else None
        if backend == "triton":
            from lowbit.kernels.qmatmul import repack

            codes, zeros, scales, g_idx = pack.unpack(self.tensors, self.quant.bits, self.quant.checkpoint_format,
                                                      self.in_features)
            layout = "auto" if dtype == torch.float16 else "slots"  # the mma kernels multiply fp16
            self.kernel_weight = repack(codes, zeros, scales, g_idx, self.quant.bits, layout)
            w = self.kernel_weight
            self._sorted_input_weight = w.for_sorted_input() if w.input_order is not None else None
            del codes, zeros
            self._move_checkpoint(torch.device("cpu"))
        self.backend = backend

    def _move_checkpoint(self, device: torch.device) -> None:
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            setattr(self, name, getattr(self, name).to(device))

    @property
    def tensors(self) -> pack.GPTQTensors:
        return pack.GPTQTensors(self.qweight, self.qzeros, self.scales, self.g_idx, self.bias)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """Float weight [out_features, in_features], computed in `dtype` (default: the scales' dtype)."""
        return pack.dequantize(self.tensors, self.quant.bits, self.quant.checkpoint_format, self.in_features, dtype)

    def input_order(self, rows: int):
        """The order (a `qmatmul.ChannelOrder`) in which this layer reads `rows` rows of input; None: in order.

        Act-order weights on the "triton" backend have their rows sorted by group; gathering x to match costs
        the GEMV a dependent load per value. The kernel that produces x (RMSNorm, SwiGLU, attention) can
        instead write it in this order and call `forward(x, sorted_input=True)`. None also where the kernel
        for that many rows reads x in channel order anyway (`qmatmul.sorted_input_pays`)."""
        w = self.kernel_weight
        if w is None or w.input_order is None:
            return None
        from lowbit.kernels.qmatmul import sorted_input_pays

        return w.input_order if sorted_input_pays(rows, w.qweight.device, w.layout) else None

    def _weight(self, sorted_input: bool):
        """The kernel weight for this input (None off the "triton" backend); raises for a sorted input the
        layer cannot read."""
        if not sorted_input:
            return self.kernel_weight
        if self._sorted_input_weight is None:
            raise ValueError("sorted_input: this layer has no input_order (it reads its input in order)")
        return self._sorted_input_weight

    def adds_in_place(self, rows: int) -> bool:
        """Whether `forward(x, add_to=h)` with `rows` rows of x adds into a float32 h at no cost of its own.

        True for the "triton" GEMV (one row) and the mma layout's kernel (the rows it takes, up to 32 by
        default): their K splits add their partial sums into h with atomics, which also drops the split-K finish
        they otherwise end with (~2.7 us a launch on an H100, BENCHMARKS.md), so decode lets every linear add into
        float32 (`Block.forward_into`). The atomics' order, and so h's last bits, vary between runs: under
        `torch.use_deterministic_algorithms(True)` this is False and the model keeps its float16 residual."""
        w = self.kernel_weight
        if w is None or torch.are_deterministic_algorithms_enabled():
            return False
        from lowbit.kernels.qmatmul import adds_itself

        return adds_itself(rows, w)

    def merges_attention(self, rows: int) -> bool:
        """Whether `add_attention` takes one-row decode attention's unmerged split partials and merges them as
        its kernel loads x (`qmatmul.merges_partials`), so that the attention kernel skips its own merge (a
        fence, a counter and the last split's reload of the partials, on the decode step's critical path). An
        act-order layer takes them placed in its `input_order`, opt-in (LOWBIT_PLACED_PARTIALS=1) until that path
        has run on a GPU."""
        w = self.kernel_weight
        if w is None or rows != 1 or not self.adds_in_place(rows):
            return False
        placed = self.input_order(rows) is not None
        if placed and os.environ.get("LOWBIT_PLACED_PARTIALS", "0") != "1":
            return False
        from lowbit.kernels.qmatmul import merges_partials

        return merges_partials(self._weight(placed))

    def add_attention(self, partials, add_to: Tensor) -> Tensor:
        """add_to (float32 [1, 1, out_features]) += attention @ W.T + b, the attention given as unmerged
        `partials.AttentionPartials` (see `merges_attention`; placed ones in `input_order`); returns add_to."""
        from lowbit.kernels.qmatmul import add_partials

        return add_partials(partials, self._weight(partials.sources is not None), self.bias, add_to)

    def forward(self, x: Tensor, sorted_input: bool = False, add_to: Tensor | None = None,
                swiglu_input: torch.dtype | None = None, order=None) -> Tensor:
        """x @ W.T + b; sorted_input: x's channels come in `input_order` (see there). add_to (float32, the
        result's shape): add the result into it instead and return it (see `adds_in_place`); order (with add_to,
        for a fused w13): the gate and up halves each come in this order, the next act-order linear's
        `input_order`. swiglu_input (a dtype): x [..., 2 * in_features] is a gate/up pair's (float32) sums and
        the input is silu(gate) * up in that dtype (the "triton" GEMV computes it as it loads x)."""
        weight = self._weight(sorted_input)
        if weight is not None:
            from lowbit.kernels.qmatmul import qmatmul

            if add_to is not None:
                return qmatmul(x, weight, self.bias, out=add_to, accumulate=True, swiglu_input=swiglu_input,
                               order=order)
            return qmatmul(x, weight, self.bias, swiglu_input=swiglu_input)
        if swiglu_input is not None:
            x = ops.silu_mul(x, dtype=swiglu_input)
        w = self.dense_weight if self.dense_weight is not None else self.dequantize(x.dtype)
        y = place_halves(F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype)), order)
        return y if add_to is None else add_to.add_(y)

    def forward_swiglu(self, x: Tensor, sorted_input: bool = False, order=None) -> Tensor:
        """silu(gate) * up of this layer's output (its columns gate then up, a fused w13): the "triton" GEMV
        computes it in its finish, saving decode a launch per layer. order: the activations come out in this
        order (the next linear's `input_order`)."""
        if self.kernel_weight is not None:
            from lowbit.kernels.qmatmul import qmatmul

            return qmatmul(x, self._weight(sorted_input), self.bias, swiglu=True, order=order)
        return ops.silu_mul(self(x, sorted_input), order)

    def extra_repr(self) -> str:
        q = self.quant
        return (f"in={self.in_features}, out={self.out_features}, bits={q.bits}, group_size={q.group_size}, "
                f"desc_act={q.desc_act}, sym={q.sym}, format={q.checkpoint_format}, backend={self.backend}")


class FloatLinear(nn.Linear):
    """An unquantized linear (nn.Linear's weight and state dict) that one-row decode can have add its output
    into a float32 buffer, as QuantLinear's GEMV does (`adds_in_place`, `Block.forward_into`).

    On CUDA, one row of x goes through `lowbit.kernels.dense.dense_gemv_add` (K splits adding with atomics,
    under PDL): a 7B fp16 model decodes at 253 rather than 236 tok/s at batch 1 (H200, benchmarks/results/
    gpu.md). LOWBIT_FLOAT_GEMV=1 also takes it on a CPU through Triton's interpreter (for tests); =0, more
    rows, and deterministic algorithms (the atomics' order varies) take nn.Linear's forward and cuBLAS."""

    def adds_in_place(self, rows: int) -> bool:
        flag = os.environ.get("LOWBIT_FLOAT_GEMV", "")
        if rows != 1 or flag == "0" or not ops.HAS_TRITON or torch.are_deterministic_algorithms_enabled():
            return False
        if self.weight.is_cuda:
            return True
        from lowbit.kernels.sync import interpreting

        return flag == "1" and interpreting()

    def forward(self, x: Tensor, sorted_input: bool = False, add_to: Tensor | None = None,
                swiglu_input: torch.dtype | None = None, order=None) -> Tensor:
        """nn.Linear's forward; add_to, swiglu_input and order as QuantLinear.forward's (a float weight reads its
        input in order: sorted_input must be False)."""
        if sorted_input:
            raise ValueError("sorted_input: a float linear reads its input in order")
        if swiglu_input is not None:
            x = ops.silu_mul(x, dtype=swiglu_input)
        if add_to is None:
            return super().forward(x)
        if order is None and x[..., 0].numel() == 1 and self.adds_in_place(1):
            from lowbit.kernels.dense import dense_gemv_add

            return dense_gemv_add(x, self.weight, self.bias, add_to)
        return add_to.add_(place_halves(super().forward(x), order))


class ConcatLinear(nn.Module):
    """Several linears over the same input whose outputs are concatenated.

    Used for q/k/v or gate/up when the parts cannot share one packed tensor (different g_idx).
    """

    def __init__(self, parts: Sequence[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


def canonical(t: pack.GPTQTensors, bits: int) -> pack.GPTQTensors:
    """Re-pack words whose count differs from ours (writers pad odd widths differently); values unchanged."""
    k, n = t.g_idx.numel(), t.scales.shape[1]
    qweight, qzeros = t.qweight, t.qzeros
    if qweight.shape[0] != pack.packed_words(k, bits):
        qweight = pack.pack_rows(pack.unpack_rows(qweight, bits, k), bits)
    if qzeros.shape[1] != pack.packed_words(n, bits):
        qzeros = pack.pack_cols(pack.unpack_cols(qzeros, bits, n), bits)
    return pack.GPTQTensors(qweight, qzeros, t.scales, t.g_idx, t.bias)


def fuse_gptq(parts: Sequence[pack.GPTQTensors], bits: int) -> pack.GPTQTensors | None:
    """Concatenate GPTQ tensors along the output axis, or None when the parts disagree on g_idx."""
    first = parts[0]
    if any(not torch.equal(p.g_idx, first.g_idx) for p in parts[1:]):
        return None
    if len(parts) == 1:
        return canonical(first, bits)
    zeros = [pack.unpack_cols(p.qzeros, bits, p.scales.shape[1]) for p in parts]
    biases = [p.bias for p in parts]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b if b is not None else torch.zeros(p.scales.shape[1], dtype=p.scales.dtype)
                          for b, p in zip(biases, parts)])
    return pack.GPTQTensors(
        qweight=torch.cat([canonical(p, bits).qweight for p in parts], dim=1),
        qzeros=pack.pack_cols(torch.cat(zeros, dim=1), bits),
        scales=torch.cat([p.scales for p in parts], dim=1),
        g_idx=first.g_idx,
        bias=bias,
    )
