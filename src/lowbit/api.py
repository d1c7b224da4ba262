"""`load(MODEL)`: whatever the user names — a folder, a .safetensors file, a .gguf file, a Hub id
`org/name[:branch]`, or a built-in name like `smollm2` — becomes a model, its tokenizer and its chat template.

This is the one place that knows all those spellings; everything below it takes a checkpoint folder.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.chat import template as templates
from lowbit.errors import LowbitError
from lowbit.model.builtin import BUILTIN, builtin_folder
from lowbit.model.gguf import convert_gguf
from lowbit.model.llama import Transformer
from lowbit.model.source import resolve
from lowbit.model.tokenizer import Tokenizer
from lowbit.model.weights import Checkpoint, load_model

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path.home() / ".cache" / "lowbit"


@dataclass
class Loaded:
    model: Transformer
    tokenizer: Tokenizer
    checkpoint: Checkpoint
    folder: Path

    def chat_template(self, name: str | None = None) -> templates.ChatTemplate:
        """The named fallback if given, else the model's own template, else an error naming the fallbacks."""
        if name:
            return templates.get(name)
        return templates.from_tokenizer_config(self.tokenizer.chat_template, self.tokenizer.special_tokens)


def model_folder(model: str, cache: Path = DEFAULT_CACHE, progress: bool = False) -> Path:
    """The local checkpoint folder for any spelling of MODEL (importing GGUF files into the cache)."""
    if model in BUILTIN and not Path(model).exists():
        return builtin_folder(model, cache, progress)
    path = resolve(model)
    if path.is_file() and path.suffix == ".gguf":
        return _imported_gguf(path, cache, progress)
    if path.is_file():
        if path.suffix in (".safetensors", ".bin", ".pt", ".pth"):
            return path.parent
        raise LowbitError(f"{path}: not a model folder, .safetensors or .gguf file")
    ggufs = sorted(path.glob("*.gguf"))
    if not (path / "config.json").exists() and len(ggufs) == 1:
        return _imported_gguf(ggufs[0], cache, progress)
    return path


def _imported_gguf(path: Path, cache: Path, progress: bool) -> Path:
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache / "gguf-imports" / f"{path.stem}-{key}"
    if not (out / "config.json").exists():
        log.info("importing %s into %s", path.name, out)
        convert_gguf(path, out, progress=progress)
    return out


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LowbitError(f"device {device!r} requested but no CUDA GPU is available")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise LowbitError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load(model: str, device: str = "auto", dtype: str = "auto", allow_pickle: bool = False,
         cache: Path = DEFAULT_CACHE, progress: bool = False) -> Loaded:
    """Load MODEL with its tokenizer onto `device` (auto: CUDA when available) in `dtype`."""
    folder = model_folder(model, cache, progress)
    dev = pick_device(device)
    net, ckpt = load_model(folder, dev, pick_dtype(dtype, dev), allow_pickle=allow_pickle, progress=progress)
    return Loaded(net, Tokenizer.from_pretrained(folder), ckpt, folder)
