"""PEFT LoRA adapters merged into a float checkpoint as its tensors are read: W' = W + scaling * B @ A.

Owns reading an adapter folder in PEFT's layout (adapter_config.json + adapter_model.safetensors, keys
`base_model.model.<module>.lora_A.weight` [r, in] / `.lora_B.weight` [out, r], embeddings
`.lora_embedding_A` [r, vocab] / `.lora_embedding_B` [dim, r], optional `.lora_B.bias`, and whole
tensors saved for `modules_to_save`, `bias="all"` or targeted embeddings), checking it against the
checkpoint before any work, and `MergedTensors`, a drop-in for `TensorFiles` whose `get` returns merged
weights. The merge follows PEFT's `LoraLayer.get_delta_weight` / `merge`: scaling = lora_alpha / r
(lora_alpha / sqrt(r) with use_rslora), alpha_pattern per module, and fan_in_fan_out ignored for nn.Linear
targets, as PEFT itself does for LLaMA.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.model.source import TensorFiles, read_json

log = logging.getLogger(__name__)

PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
_LINEAR = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_B.bias": "bias"}
_EMBEDDING = {"lora_embedding_A": "A", "lora_embedding_B": "B"}


@dataclass(frozen=True)
class LoraDelta:
    """One adapted tensor, by the adapter keys of A [r, in] and B [out, r] (embedding: A [r, vocab], B [dim, r])."""

    A: str
    B: str
    scaling: float
    embedding: bool

    def delta(self, adapter: TensorFiles) -> Tensor:
        """scaling * B @ A in float32, in the base tensor's orientation ([out, in]; embedding [vocab, dim])."""
        d = (adapter.get(self.B).float() @ adapter.get(self.A).float()) * self.scaling
        return d.t() if self.embedding else d


class MergedTensors:
    """A checkpoint's tensors with an adapter merged in, read lazily like the `TensorFiles` it wraps."""

    def __init__(self, base: TensorFiles, adapter: TensorFiles, deltas: dict[str, LoraDelta],
                 replaced: dict[str, Tensor | str]):
        self.base, self.adapter, self.deltas, self.replaced = base, adapter, deltas, replaced
        self.files = base.files

    def keys(self) -> list[str]:
        return self.base.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def nbytes(self) -> int:
        return self.base.nbytes()

    def get(self, name: str) -> Tensor:
        """The base tensor (or the adapter's whole copy of it) plus its LoRA delta, rounded once to its dtype."""
        t = self.base.get(name)
        if name in self.replaced:
            new = self.replaced[name]
            t = (self.adapter.get(new) if isinstance(new, str) else new).to(t.dtype)
        if name in self.deltas:
            t = (t.float() + self.deltas[name].delta(self.adapter)).to(t.dtype)
        return t


def merge_adapter(base: TensorFiles, folder: Path) -> MergedTensors:
    """Check the adapter at `folder` against the checkpoint's tensors (names, shapes) and return the merged view.

    Only shapes are read here; the LoRA factors are read again, tensor by tensor, as the merged weights are.
    """
    config = _adapter_config(folder)
    adapter = _adapter_tensors(folder)
    modules, whole = _group_keys(adapter.keys(), folder)
    if config.get("fan_in_fan_out"):
        log.warning("%s: fan_in_fan_out is set but LLaMA layers are nn.Linear; ignoring it, as PEFT does", folder)
    deltas: dict[str, LoraDelta] = {}
    replaced: dict[str, Tensor | str] = {}
    for module, parts in modules.items():
        name = _base_name(base, module, "weight", folder)
        deltas[name] = _delta(module, parts, adapter, config, folder)
        _check_shapes(name, base.shape(name), deltas[name], adapter, folder)
        if "bias" in parts:  # PEFT lora_bias: base bias += lora_B.bias * scaling
            bias_name = _base_name(base, module, "bias", folder)
            replaced[bias_name] = (base.get(bias_name).float()
                                   + adapter.get(parts["bias"]).float() * deltas[name].scaling)
    for key in whole:  # modules_to_save, bias="all", saved embedding layers: PEFT saves these tensors whole
        module, _, kind = key[len(PREFIX):].rpartition(".")
        module = module.removesuffix(".base_layer")  # a targeted embedding's own weight (save_embedding_layers)
        name = _base_name(base, module, kind, folder)
        if tuple(adapter.shape(key)) != tuple(base.shape(name)):
            raise LowbitError(f"{folder}: {key} has shape {tuple(adapter.shape(key))}, the model's {name} "
                              f"{tuple(base.shape(name))}")
        replaced[name] = key
    log.info("merging LoRA adapter %s: %d tensors updated, %d replaced", folder.name, len(deltas), len(whole))
    return MergedTensors(base, adapter, deltas, replaced)


def _adapter_config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise LowbitError(f"{folder}: no such adapter folder (expected adapter_config.json + {WEIGHTS})")
    config = read_json(folder / "adapter_config.json")
    kind = str(config.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise LowbitError(f"{folder}: a {kind} adapter; lowbit merges LoRA adapters only")
    if config.get("use_dora"):
        raise LowbitError(f"{folder}: a DoRA adapter (use_dora); lowbit merges plain LoRA adapters only")
    if "lora_alpha" not in config:
        raise LowbitError(f"{folder}: adapter_config.json lacks lora_alpha")
    return config


def _adapter_tensors(folder: Path) -> TensorFiles:
    path = folder / WEIGHTS
    if not path.exists():
        pickled = folder / "adapter_model.bin"
        hint = (f"; {pickled.name} is a pickle file, which can run code when loaded: convert it to {WEIGHTS}"
                if pickled.exists() else "")
        raise LowbitError(f"{folder}: missing {WEIGHTS}{hint}")
    return TensorFiles([path])


def _group_keys(keys: list[str], folder: Path) -> tuple[dict[str, dict[str, str]], list[str]]:
    """-> ({module: {"A"/"B"/"bias": key}}, keys of whole tensors); refuses what a plain merge cannot do."""
    modules: dict[str, dict[str, str]] = {}
    whole = []
    for key in keys:
        if not key.startswith(PREFIX):
            raise LowbitError(f"{folder}: unexpected tensor {key} (PEFT LoRA keys start with {PREFIX!r})")
        if "lora_magnitude_vector" in key:
            raise LowbitError(f"{folder}: a DoRA adapter ({key}); lowbit merges plain LoRA adapters only")
        kind = _kind(key)
        if kind is None:
            if "lora_" in key.rpartition(".")[2] or ".lora_" in key:
                raise LowbitError(f"{folder}: unsupported adapter tensor {key}")
            whole.append(key)
            continue
        module, role = kind
        modules.setdefault(module, {})[role] = key
    for module, parts in modules.items():
        if not ({"A", "B"} <= parts.keys() or {"embA", "embB"} <= parts.keys()):
            raise LowbitError(f"{folder}: {module} lacks one of its LoRA factors (has {', '.join(parts.values())})")
    if not modules and not whole:
        raise LowbitError(f"{folder}: {WEIGHTS} holds no LoRA tensors")
    return modules, whole


def _kind(key: str) -> tuple[str, str] | None:
    """key -> (module path without the PEFT prefix, role "A" | "B" | "bias" | "embA" | "embB"), None otherwise."""
    body = key[len(PREFIX):]
    for suffix, role in _LINEAR.items():
        if body.endswith("." + suffix):
            return body[: -len(suffix) - 1], role
    for suffix, role in _EMBEDDING.items():
        if body.endswith("." + suffix):
            return body[: -len(suffix) - 1], "emb" + role
    return None


def _delta(module: str, parts: dict[str, str], adapter: TensorFiles, config: dict[str, Any],
           folder: Path) -> LoraDelta:
    embedding = "embA" in parts
    A, B = (parts["embA"], parts["embB"]) if embedding else (parts["A"], parts["B"])
    a, b = adapter.shape(A), adapter.shape(B)
    if len(a) != 2 or len(b) != 2 or b[1] != a[0] or a[0] == 0:
        raise LowbitError(f"{folder}: {module}: LoRA A {tuple(a)} and B {tuple(b)} do not share a rank")
    r = a[0]
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return LoraDelta(A, B, scaling, embedding)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's get_pattern_key: the first pattern that matches the end of the module path."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _base_name(base: TensorFiles, module: str, kind: str, folder: Path) -> str:
    """The checkpoint name for an adapter module path (with or without the LlamaForCausalLM 'model.' level)."""
    candidates = [f"{module}.{kind}", f"{module.removeprefix('model.')}.{kind}", f"model.{module}.{kind}"]
    for name in candidates:
        if name in base:
            return name
    raise LowbitError(f"{folder}: the adapter changes {module}.{kind}, which the model does not have "
                      "(an adapter for another architecture?)")


def _check_shapes(name: str, shape: tuple[int, ...], d: LoraDelta, adapter: TensorFiles, folder: Path) -> None:
    a, b = adapter.shape(d.A), adapter.shape(d.B)
    out_in = (a[1], b[0]) if d.embedding else (b[0], a[1])
    if tuple(shape) != out_in:
        raise LowbitError(f"{folder}: the LoRA update for {name} is {out_in[0]}x{out_in[1]}, the model's tensor "
                          f"is {'x'.join(map(str, shape))} (an adapter for another model size?)")
