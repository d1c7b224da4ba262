"""Writing a quantized model: per-layer files while the run goes on, one HF-layout folder at the end.

During a run, each finished layer is saved (GPTQ tensors under HF names, zeros in v2 packing) into a hidden
`.NAME.partial` folder beside the output, together with the activations every minute or so, so `--resume`
continues from there. `assemble` streams everything into shards, converting zeros to the final checkpoint
format (v1 unless some zero point cannot be stored in it), and publishes the folder atomically.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lowbit.config import QuantConfig
from lowbit.errors import LowbitError
from lowbit.model.checkpoint import staged_folder, write_shards
from lowbit.model.source import TensorFiles
from lowbit.model.weights import Checkpoint, global_tensor_names, hf_part_names
from lowbit.quant import pack
from lowbit.quant.quantizer import QuantResult

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "generation_config.json", "added_tokens.json", "vocab.json", "merges.txt")


@dataclass
class PartialRun:
    """The hidden folder of an unfinished run: finished layers, activations, and what produced them."""

    folder: Path
    fingerprint: str

    @classmethod
    def for_output(cls, out_dir: Path, fingerprint: str, resume: bool, settings: dict[str, Any] | None = None
                   ) -> PartialRun:
        """The partial folder for OUT_DIR: continued when `resume` and the settings match, else started afresh.

        `settings` (JSON-able) is stored beside the fingerprint so that a refused resume can say what differs.
        """
        folder = out_dir.with_name(f".{out_dir.name}.partial")
        run = cls(folder, fingerprint)
        state = run.state()
        if state and not resume:
            shutil.rmtree(folder)
        elif state and state["fingerprint"] != fingerprint:
            raise LowbitError(f"cannot resume {out_dir}: {settings_difference(state.get('settings'), settings)}; "
                              "run without --resume to start over")
        elif state:
            log.info("resuming %s: %d layers already done", out_dir, state["layers_done"])
        folder.mkdir(parents=True, exist_ok=True)
        if not run.state():
            run._write_state({"fingerprint": fingerprint, "settings": settings, "layers_done": 0,
                              "inputs_layer": None, "v1_overflow": False})
        return run

    def state(self) -> dict[str, Any] | None:
        path = self.folder / "progress.json"
        return json.loads(path.read_text()) if path.exists() else None

    def _write_state(self, state: dict[str, Any]) -> None:
        tmp = self.folder / "progress.json.tmp"
        tmp.write_text(json.dumps(state))
        tmp.replace(self.folder / "progress.json")

    def layer_file(self, layer: int) -> Path:
        return self.folder / f"layer-{layer:05d}.safetensors"

    def save_layer(self, ckpt: Checkpoint, layer: int, results: dict[str, QuantResult], bits: int) -> None:
        from safetensors.torch import save_file

        tensors, overflow = layer_tensors(ckpt, layer, results, bits)
        save_file(tensors, str(self.layer_file(layer)))
        state = self.state()
        state["layers_done"] = layer + 1
        state["v1_overflow"] = state["v1_overflow"] or overflow
        self._write_state(state)

    def save_inputs(self, inputs: Tensor, layer: int) -> None:
        """Activations that enter `layer`, so a resumed run restarts there."""
        tmp = self.folder / "inputs.pt.tmp"
        torch.save(inputs, tmp)
        tmp.replace(self.folder / "inputs.pt")
        state = self.state()
        state["inputs_layer"] = layer
        self._write_state(state)

    def load_inputs(self, device: torch.device) -> tuple[Tensor, int] | None:
        state = self.state()
        if state is None or state["inputs_layer"] is None:
            return None
        inputs = torch.load(self.folder / "inputs.pt", map_location=device, weights_only=True)
        return inputs, state["inputs_layer"]


def settings_difference(before: dict[str, Any] | None, now: dict[str, Any] | None) -> str:
    """'the interrupted run used bits=4, this one bits=3' for the first differing settings, flattened."""
    a, b = _flatten(before or {}), _flatten(now or {})
    keys = [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]
    if not keys:
        return "the interrupted run used other calibration data or another model"
    shown = keys[:3]
    return (f"the interrupted run used {', '.join(f'{k}={a.get(k)}' for k in shown)}, "
            f"this one {', '.join(f'{k}={b.get(k)}' for k in shown)}")


def _flatten(d: dict[str, Any]) -> dict[str, Any]:
    """Nested settings as one level (the field names of QuantConfig and CalibrationConfig do not collide)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v) if isinstance(v, dict) else {k: v})
    return out


def layer_tensors(ckpt: Checkpoint, layer: int, results: dict[str, QuantResult], bits: int
                  ) -> tuple[dict[str, Tensor], bool]:
    """GPTQ tensors under HF names for one layer (fused results split back into q/k/v, gate/up)."""
    tensors, overflow = {}, False
    for ours, result in results.items():
        start = 0
        for part in hf_part_names(ckpt, layer, ours):
            rows = ckpt.tensors.shape(f"{part}.weight")[0]
            cols = slice(start, start + rows)
            start += rows
            zeros = result.zeros[:, cols]
            overflow = overflow or pack.v1_zero_overflow(zeros, bits)
            bias = ckpt.tensors.get(f"{part}.bias") if f"{part}.bias" in ckpt.tensors else None
            t = pack.pack(result.codes[:, cols], zeros, result.scales[:, cols], result.g_idx, bits, "gptq_v2", bias)
            for kind in ("qweight", "qzeros", "scales", "g_idx", "bias"):
                if getattr(t, kind) is not None:
                    tensors[f"{part}.{kind}"] = getattr(t, kind).clone()
    return tensors, overflow


def final_format(requested: str, v1_overflow: bool) -> str:
    if requested == "gptq" and v1_overflow:
        log.warning("some asymmetric zero points are 0, which the v1 'gptq' format cannot store; "
                    "writing checkpoint_format 'gptq_v2' instead (read by lowbit and GPTQModel)")
        return "gptq_v2"
    return requested


def assembled_tensors(ckpt: Checkpoint, run: PartialRun, bits: int, fmt: str) -> Iterator[tuple[str, Tensor]]:
    """Float tensors outside the layers, then every layer's GPTQ tensors with zeros in format `fmt`."""
    for name in global_tensor_names(ckpt):
        if not (name == "lm_head.weight" and ckpt.config.tie_word_embeddings):
            yield name, as_float16(name, ckpt.tensors.get(name))
    for layer in range(ckpt.config.num_layers):
        layer_files = TensorFiles([run.layer_file(layer)])
        for name in sorted(layer_files.keys()):
            t = layer_files.get(name)
            if name.endswith(".qzeros") and fmt == "gptq":
                t = to_v1_zeros(t, bits, layer_files.shape(name.removesuffix(".qzeros") + ".scales")[1])
            yield name, t
        yield from _float_layer_tensors(ckpt, layer)


def _float_layer_tensors(ckpt: Checkpoint, layer: int) -> Iterator[tuple[str, Tensor]]:
    for hf in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        name = ckpt.hf_name(layer, hf)
        yield name, as_float16(name, ckpt.tensors.get(name))


def as_float16(name: str, t: Tensor) -> Tensor:
    """The unquantized tensors in float16, as every GPTQ loader expects (ExLlama and TGI read no other)."""
    if not t.is_floating_point() or t.dtype == torch.float16:
        return t
    if not torch.isfinite(t).all() or t.abs().max() > torch.finfo(torch.float16).max:
        raise LowbitError(f"{name} has values outside float16's range; GPTQ checkpoints store it in float16")
    return t.to(torch.float16)


def to_v1_zeros(qzeros_v2: Tensor, bits: int, out_features: int) -> Tensor:
    """Re-pack v2 (true) zero points as v1 (stored minus one); callers checked that none is 0.

    Only the `out_features` real values are converted: the padding that fills the last word stays 0.
    """
    return pack.pack_cols(pack.unpack_cols(qzeros_v2, bits, out_features).to(torch.int32) - 1, bits)


def quantized_config(ckpt: Checkpoint, quant: QuantConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """quantize_config.json as AutoGPTQ/GPTQModel write it (also embedded in config.json)."""
    return {**quant.to_dict(), "model_name_or_path": meta.get("model_name_or_path", str(ckpt.folder)),
            "model_file_base_name": "model", **{k: v for k, v in meta.items() if k != "model_name_or_path"}}


def assemble(ckpt: Checkpoint, run: PartialRun, quant: QuantConfig, out_dir: Path, card: Callable[[int], str],
             meta: dict[str, Any], max_shard_bytes: int, overwrite: bool = False) -> Path:
    """Publish OUT_DIR atomically from the finished layers; remove the partial folder.

    card(size of the weight files in bytes) -> the README.md text.
    """
    qdict = quantized_config(ckpt, quant, meta)
    config = json.loads((ckpt.folder / "config.json").read_text())
    config["quantization_config"] = qdict
    config["torch_dtype"] = "float16"  # the GPTQ tensors' dtype; also what the unquantized ones are stored in
    if "dtype" in config:
        config["dtype"] = "float16"
    with staged_folder(out_dir, overwrite) as tmp:
        shards = write_shards(tmp, assembled_tensors(ckpt, run, quant.bits, quant.checkpoint_format), max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "quantize_config.json").write_text(json.dumps(qdict, indent=2) + "\n")
        (tmp / "README.md").write_text(card(sum(f.stat().st_size for f in shards)))
        for name in TOKENIZER_FILES:
            if (ckpt.folder / name).exists():
                shutil.copy2(ckpt.folder / name, tmp / name)
    shutil.rmtree(run.folder, ignore_errors=True)
    return out_dir
