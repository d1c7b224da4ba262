"""The layer-by-layer GPTQ loop: capture layer inputs, hook each linear group, quantize, propagate.

Only one decoder layer's float weights sit on the device at a time (streamed from the checkpoint's shards).
For each layer, the linear groups are quantized in true-sequential order — q/k/v (one fused matrix: GPTQ
treats rows independently, so one Hessian serves all three), then o, then gate/up, then down — each group
seeing the inputs produced by the already-quantized groups before it. The quantized layer then produces the
next layer's inputs. The math is `lowbit.quant.gptq`; writing files is `lowbit.quant.export`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lowbit.config import QuantConfig
from lowbit.model.llama import Block, Rotary
from lowbit.model.weights import Checkpoint, load_float_block
from lowbit.quant.gptq import GPTQ
from lowbit.quant.quantizer import QuantResult, rtn

log = logging.getLogger(__name__)

# True-sequential order: each group's inputs depend on the groups before it.
SEQUENTIAL_GROUPS = (("attention.wqkv",), ("attention.wo",), ("mlp.w13",), ("mlp.w2",))
ALL_AT_ONCE = (("attention.wqkv", "attention.wo", "mlp.w13", "mlp.w2"),)
TOKENS_PER_BATCH = 8192  # calibration samples run through a layer in batches of about this many tokens


@dataclass
class LayerResult:
    layer: int
    results: dict[str, QuantResult]  # our linear name -> quantized weight
    seconds: float
    # seconds: load (waiting for the weights), forward (calibration forwards incl. Hessian accumulation), quantize
    phases: dict[str, float] = field(default_factory=dict)


class _Stop(Exception):
    """Raised by a hook to end a layer's forward once the inputs it needs are captured."""


def embed_inputs(ckpt: Checkpoint, tokens: Tensor, device: torch.device, dtype: torch.dtype,
                 store: torch.device) -> Tensor:
    """Layer-0 inputs [n, T, hidden] for the calibration tokens, kept on `store`."""
    name = ckpt.prefix + "embed_tokens.weight"
    table = ckpt.tensors.get(name).to(device=device, dtype=dtype)
    out = torch.empty(*tokens.shape, table.shape[1], dtype=dtype, device=store,
                      pin_memory=store.type == "cpu" and device.type == "cuda")
    for i in range(tokens.shape[0]):
        out[i] = table[tokens[i].to(device)].to(store)
    return out


def quantize_layers(ckpt: Checkpoint, quant: QuantConfig, inputs: Tensor | None, device: torch.device,
                    dtype: torch.dtype, method: str = "gptq", mse: bool = False, start: int = 0
                    ) -> Iterator[LayerResult]:
    """Quantize layers start..L-1; `inputs` (layer `start`'s inputs, None for RTN) is updated in place.

    The next layer's weights are read from disk (into pinned memory for a GPU) by a helper thread while
    the current layer is quantized, so reading the shards overlaps the GPU work.
    """
    rope = None
    if inputs is not None:
        positions = torch.arange(inputs.shape[1], device=device)[None]
        rope = Rotary(ckpt.config).to(device)(positions, dtype)
    layers = range(start, ckpt.config.num_layers)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lowbit-prefetch") as pool:
        pending: Future | None = pool.submit(_read_block, ckpt, start, device, dtype) if layers else None
        for layer in layers:
            t0 = _clock(device)
            block = pending.result().to(device, non_blocking=True)
            pending = pool.submit(_read_block, ckpt, layer + 1, device, dtype) if layer + 1 in layers else None
            t1 = _clock(device)
            phases = {"load": t1 - t0}
            if method == "rtn":  # the textbook baseline: zeros in [0, maxq], as every tool's RTN (export may
                # then pick gptq_v2); GPTQ keeps zeros the requested format stores
                results = {name: rtn(block.get_submodule(name).weight, quant.bits, quant.group_size, quant.sym, mse)
                           for group in ALL_AT_ONCE for name in group}
                phases["quantize"] = _clock(device) - t1
            else:
                results = _gptq_layer(block, inputs, rope, quant, mse, phases)
                t2 = _clock(device)
                _propagate(block, inputs, rope)
                phases["forward"] += _clock(device) - t2
            del block
            yield LayerResult(layer, results, _clock(device) - t0, phases)


def _read_block(ckpt: Checkpoint, layer: int, device: torch.device, dtype: torch.dtype) -> Block:
    """One layer's float weights on the host (pinned when they go to a GPU), ready for `.to(device)`."""
    block = load_float_block(ckpt, layer, torch.device("cpu"), dtype)
    if device.type == "cuda":
        for p in block.parameters():
            p.data = p.data.pin_memory()
    return block


def _clock(device: torch.device) -> float:
    """perf_counter after the device's queued work, so that phase times are the phases' own."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _gptq_layer(block: Block, inputs: Tensor, rope, quant: QuantConfig, mse: bool,
                phases: dict[str, float]) -> dict[str, QuantResult]:
    """Quantize the block's linears group by group; adds the seconds spent to phases' forward/quantize."""
    groups = SEQUENTIAL_GROUPS if quant.true_sequential else ALL_AT_ONCE
    results: dict[str, QuantResult] = {}
    device = block.attention_norm.weight.device
    phases.setdefault("forward", 0.0)
    phases.setdefault("quantize", 0.0)
    for group in groups:
        t0 = _clock(device)
        linears = {name: block.get_submodule(name) for name in group}
        solvers = {name: GPTQ(m.weight) for name, m in linears.items()}
        _capture(block, inputs, rope, linears, solvers, stop_after=group[-1] if len(groups) > 1 else None)
        t1 = _clock(device)
        phases["forward"] += t1 - t0
        for name, solver in solvers.items():
            result = solver.quantize(quant, mse=mse, keep_hessian=False)
            linears[name].weight.data.copy_(result.W_q)  # W_q is built on demand: no copy is kept
            results[name] = result
            log.info("%s: loss %.4g%s", name, result.loss, f" (damp raised to {result.damp_used:g})"
                     if result.damp_used > quant.damp_percent else "")
        del solvers
        phases["quantize"] += _clock(device) - t1
    return results


def _capture(block: Block, inputs: Tensor, rope, linears: dict[str, nn.Module], solvers: dict[str, GPTQ],
             stop_after: str | None) -> None:
    """Run the calibration batches through the block, feeding each hooked linear's inputs to its solver."""
    def hook(name):
        def fn(module, args):
            solvers[name].add_batch(args[0])
            if name == stop_after:
                raise _Stop
        return fn

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    try:
        for x, cos_sin in _batches(inputs, rope):
            try:
                block(x, cos_sin, None, None, None, None)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def _propagate(block: Block, inputs: Tensor, rope) -> None:
    """Replace `inputs` by the quantized layer's outputs (the next layer's inputs)."""
    start = 0
    for x, cos_sin in _batches(inputs, rope):
        n = x.shape[0]
        inputs[start:start + n] = block(x, cos_sin, None, None, None, None).to(inputs.device)
        start += n


def _batches(inputs: Tensor, rope):
    """Calibration samples in device-sized batches, with the matching rope tables."""
    n, seqlen = inputs.shape[:2]
    step = max(1, TOKENS_PER_BATCH // seqlen)
    device = rope[0].device
    for i in range(0, n, step):
        x = inputs[i:i + step].to(device, non_blocking=True)
        b = x.shape[0]
        yield x, (rope[0].expand(b, -1, -1), rope[1].expand(b, -1, -1))
