"""Delta weights (how Vicuna v0 was released): OUT = BASE + DELTA, tensor by tensor, as FastChat's
`apply_delta` computes it.

Owns the pairing of the two checkpoints' tensors (same names; same shapes, except that the delta's
embedding and lm_head may have more rows for tokens it added, which then come from the delta alone, as in
FastChat's `param.data[:rows, :cols] += base`), the sum (float32, rounded once to the delta's dtype), and
the output folder: the delta's config and tokenizer, shards streamed one tensor at a time, published
atomically. Reading files is `lowbit.model.source`; writing them `lowbit.model.checkpoint`.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from torch import Tensor
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.model.checkpoint import MAX_SHARD_BYTES, staged_folder, write_shards
from lowbit.model.source import TensorFiles, read_json, weight_files

log = logging.getLogger(__name__)

VOCAB_TENSORS = ("embed_tokens.weight", "lm_head.weight")  # may grow rows when the delta adds tokens
IGNORED = ("rotary_emb.inv_freq",)  # buffers old conversions saved; recomputed by every loader
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "added_tokens.json", "chat_template.jinja")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


@dataclass(frozen=True)
class DeltaReport:
    out_dir: Path
    tensors: int
    grown: tuple[str, ...]  # vocabulary tensors with rows that only the delta has


def apply_delta(base: Path, delta: Path, out_dir: Path, overwrite: bool = False, allow_pickle: bool = False,
                max_shard_bytes: int = MAX_SHARD_BYTES, progress: bool = False) -> DeltaReport:
    """Write BASE + DELTA to OUT_DIR; every name and shape is checked before anything is written."""
    out_dir = Path(out_dir)
    for src in (base, delta):
        if out_dir.resolve() == Path(src).resolve():
            raise LowbitError(f"the output folder must differ from the inputs ({src})")
    if out_dir.exists() and not overwrite:
        raise LowbitError(f"{out_dir} already exists; pass --overwrite to replace it")
    read_json(Path(delta) / "config.json")  # the output's config: it must be there and parse
    b = TensorFiles(weight_files(Path(base), allow_pickle))
    d = TensorFiles(weight_files(Path(delta), allow_pickle))
    names, grown = pair_tensors(b, d, Path(base), Path(delta))
    with staged_folder(out_dir, overwrite) as tmp:
        write_shards(tmp, _summed(b, d, names, progress), max_shard_bytes)
        _copy_side_files(Path(base), Path(delta), tmp)
    return DeltaReport(out_dir, len(names), tuple(grown))


def pair_tensors(base: TensorFiles, delta: TensorFiles, base_dir: Path, delta_dir: Path
                 ) -> tuple[list[str], list[str]]:
    """The delta's tensor names in file order, and those whose rows grow; one clear error for any mismatch."""
    b = [n for n in base.keys() if not n.endswith(IGNORED)]
    d = [n for n in delta.keys() if not n.endswith(IGNORED)]
    if any(n.endswith(".qweight") for n in b + d):
        raise LowbitError("apply-delta works on float checkpoints; one of the inputs is GPTQ-quantized")
    only_base, only_delta = sorted(set(b) - set(d)), sorted(set(d) - set(b))
    if only_base or only_delta:
        side, missing = (delta_dir, only_base) if only_base else (base_dir, only_delta)
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise LowbitError(f"{side} lacks tensor {', '.join(missing[:3])}{more}: the delta does not belong to this "
                          "base model")
    grown = []
    for name in d:
        bs, ds = tuple(base.shape(name)), tuple(delta.shape(name))
        if bs == ds:
            continue
        if name.endswith(VOCAB_TENSORS) and len(bs) == len(ds) == 2 and bs[1] == ds[1] and bs[0] < ds[0]:
            grown.append(name)
            continue
        raise LowbitError(f"{name}: the base has shape {bs}, the delta {ds}; the delta does not belong to this base "
                          "model")
    return d, grown


def add(base: Tensor, delta: Tensor) -> Tensor:
    """base + delta in float32, rounded once to the delta's dtype; rows past the base's are the delta's."""
    if not (base.is_floating_point() and delta.is_floating_point()):
        raise LowbitError(f"apply-delta adds float tensors; got {base.dtype} and {delta.dtype}")
    out = delta.float()  # a copy for float16/bfloat16; cloned below for float32
    if out.data_ptr() == delta.data_ptr():
        out = out.clone()
    out[: base.shape[0]] += base.float()
    return out.to(delta.dtype)


def _summed(base: TensorFiles, delta: TensorFiles, names: list[str], progress: bool) -> Iterator[tuple[str, Tensor]]:
    for name in tqdm(names, desc="applying delta", unit="tensor", disable=not progress):
        yield name, add(base.get(name), delta.get(name))


def _copy_side_files(base: Path, delta: Path, out: Path) -> None:
    """The delta's config and tokenizer (the tokens it added live there); the base's tokenizer if it has none."""
    for name in SIDE_FILES:
        if (delta / name).exists():
            shutil.copy2(delta / name, out / name)
    if not any((out / name).exists() for name in TOKENIZER_FILES):
        log.warning("%s has no tokenizer; copying the base model's", delta)
        for name in SIDE_FILES[2:]:
            if (base / name).exists():
                shutil.copy2(base / name, out / name)
