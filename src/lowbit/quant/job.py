"""`quantize(source, out_dir, ...)`: one whole quantization run, from a float folder to a GPTQ folder.

Checks the request before any heavy work, prepares calibration windows, drives the layer loop with a
progress bar, keeps a resumable partial folder, picks the final checkpoint format, and publishes the
output. The Python API behind `lowbit quantize`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from lowbit.config import CalibrationConfig, QuantConfig
from lowbit.errors import LowbitError
from lowbit.model.checkpoint import MAX_SHARD_BYTES
from lowbit.model.lora import merge_adapter
from lowbit.model.tokenizer import Tokenizer
from lowbit.model.weights import Checkpoint, open_checkpoint
from lowbit.quant.calibrate import LayerResult, embed_inputs, quantize_layers
from lowbit.quant.card import Variant, model_card
from lowbit.quant.export import PartialRun, assemble, final_format

log = logging.getLogger(__name__)

INPUTS_SAVE_SECONDS = 60.0  # save activations for --resume at most this often


@dataclass(frozen=True)
class QuantizeReport:
    out_dir: Path
    quant: QuantConfig
    seconds: float
    peak_gpu_bytes: int
    size_bytes: int
    mean_loss: float


def check_request(source: Path, out_dir: Path, overwrite: bool) -> Checkpoint:
    """Everything that can be refused before work starts."""
    if out_dir.exists() and not overwrite:
        raise LowbitError(f"{out_dir} already exists; pass --overwrite to replace it")
    if out_dir.resolve() == source.resolve():
        raise LowbitError("the output folder must differ from the model folder")
    ckpt = open_checkpoint(source)
    if ckpt.quant is not None:
        raise LowbitError(f"{source} is already GPTQ-quantized; quantize from the float model")
    return ckpt


def calibration_tokens(source: Path, ckpt: Checkpoint, calib: CalibrationConfig) -> torch.Tensor:
    from lowbit.data import calibration_windows, load_texts

    tokenizer = Tokenizer.from_pretrained(source)
    seqlen = min(calib.seqlen, ckpt.config.max_position_embeddings)
    texts = load_texts(calib.dataset, "train", tokenizer)
    return calibration_windows(tokenizer, texts, calib.nsamples, seqlen, calib.seed)


def quantize(source: Path, out_dir: Path, quant: QuantConfig, calib: CalibrationConfig, method: str = "gptq",
             mse: bool = False, device: torch.device = torch.device("cpu"), resume: bool = False,
             overwrite: bool = False, progress: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES,
             tokens: torch.Tensor | None = None, lora: Path | None = None,
             on_layer: Callable[[LayerResult], None] | None = None) -> QuantizeReport:
    """Quantize the float checkpoint at `source` into `out_dir`.

    tokens: precomputed calibration windows [n, seqlen] (else drawn from calib.dataset); lora: a PEFT LoRA
    adapter folder merged into the float weights as they are read; on_layer: called after each layer is
    saved to the resumable partial folder (progress reporting, tests that interrupt a run).
    """
    if method not in ("gptq", "rtn"):
        raise LowbitError(f"unknown method {method!r}; choose gptq or rtn")
    t0 = time.perf_counter()
    ckpt = check_request(source, out_dir, overwrite)
    if lora is not None:
        ckpt = dataclasses.replace(ckpt, tensors=merge_adapter(ckpt.tensors, Path(lora)))
    if method == "gptq" and tokens is None:
        tokens = calibration_tokens(source, ckpt, calib)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    settings = run_settings(source, quant, calib, method, mse, lora)
    run = PartialRun.for_output(out_dir, _fingerprint(settings, tokens), resume, settings)
    losses = _run_layers(ckpt, quant, method, mse, tokens, device, dtype, run, progress, on_layer)
    final = dataclasses.replace(quant, checkpoint_format=final_format(quant.checkpoint_format, run.state()["v1_overflow"]))
    meta = {"model_name_or_path": ckpt.folder.name, "method": method,
            "calibration": None if method == "rtn" else dataclasses.asdict(calib)}
    def card(size: int) -> str:
        return model_card(ckpt, [Variant(final, calib if method == "gptq" else None, size)],
                          source_name=ckpt.folder.name, lora_name=Path(lora).name if lora is not None else None)

    assemble(ckpt, run, final, out_dir, card, meta, max_shard_bytes, overwrite)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    size = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
    mean_loss = sum(losses) / len(losses) if losses else float("nan")
    return QuantizeReport(out_dir, final, time.perf_counter() - t0, peak, size, mean_loss)


def _run_layers(ckpt, quant, method, mse, tokens, device, dtype, run: PartialRun, progress: bool,
                on_layer: Callable[[LayerResult], None] | None) -> list[float]:
    num_layers = ckpt.config.num_layers
    inputs, start = None, 0
    if method == "gptq":
        saved = run.load_inputs(_store_device(tokens, ckpt, device, dtype))
        if saved is not None:
            inputs, start = saved
            log.info("resuming at layer %d", start)
        else:
            inputs = embed_inputs(ckpt, tokens, device, dtype, _store_device(tokens, ckpt, device, dtype))
    else:
        start = run.state()["layers_done"]
    losses, last_save = [], time.perf_counter()
    bar = tqdm(total=num_layers, initial=start, desc="quantizing", unit="layer", disable=not progress)
    for result in quantize_layers(ckpt, quant, inputs, device, dtype, method, mse, start):
        run.save_layer(ckpt, result.layer, result.results, quant.bits)
        losses += [r.loss for r in result.results.values()]
        more = result.layer + 1 < num_layers
        if inputs is not None and more and time.perf_counter() - last_save > INPUTS_SAVE_SECONDS:
            run.save_inputs(inputs, result.layer + 1)
            last_save = time.perf_counter()
        bar.update(1)
        bar.set_postfix(loss=f"{sum(r.loss for r in result.results.values()):.3g}", s=f"{result.seconds:.1f}")
        if on_layer is not None:
            on_layer(result)
    bar.close()
    return losses


def _store_device(tokens: torch.Tensor, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype) -> torch.device:
    """Keep activations on the GPU when two copies fit comfortably, else in (pinned) host memory."""
    if device.type != "cuda":
        return device
    need = 2 * tokens.numel() * ckpt.config.hidden_size * torch.finfo(dtype).bits // 8
    free, _ = torch.cuda.mem_get_info(device)
    return device if need < 0.5 * free else torch.device("cpu")


def run_settings(source: Path, quant: QuantConfig, calib: CalibrationConfig, method: str, mse: bool,
                 lora: Path | None) -> dict:
    """What a run's result depends on, as JSON (with the calibration tokens: its resume fingerprint)."""
    return {"source": str(source.resolve()), "quant": dataclasses.asdict(quant),
            "calibration": dataclasses.asdict(calib) if method == "gptq" else None, "method": method, "mse": mse,
            "lora": None if lora is None else _file_identity(Path(lora))}


def _file_identity(folder: Path) -> str:
    """An adapter folder by path, size and modification time of its files (cheap; content hashing is not)."""
    files = sorted(f for f in folder.iterdir() if f.is_file())
    return f"{folder.resolve()}:" + ",".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)


def _fingerprint(settings: dict, tokens: torch.Tensor | None) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    if tokens is not None:
        h.update(tokens.numpy().tobytes())
    return h.hexdigest()[:16]
