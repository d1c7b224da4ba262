"""Writing HF-layout checkpoint folders: safetensors shards + index, config, tokenizer, side files.

The folder appears atomically: everything is written to a temporary sibling and renamed into place at the
end, so an interrupted write never leaves a folder that looks complete. Used by the GGUF import and the
quantizer; reading is `lowbit.model.source` / `lowbit.model.weights`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch

from lowbit.errors import LowbitError

MAX_SHARD_BYTES = 4 * 1024**3


@contextmanager
def staged_folder(out_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces OUT_DIR, on failure it vanishes."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise LowbitError(f"{out_dir} already exists; pass --overwrite to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_folder(out_dir: Path, tensors: Iterable[tuple[str, torch.Tensor]], config: dict[str, Any],
                 tokenizer: Any = None, overwrite: bool = False, extra_files: dict[str, str] | None = None,
                 max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Stream (name, tensor) pairs into shards of at most `max_shard_bytes`, then publish the folder."""
    with staged_folder(out_dir, overwrite) as tmp:
        write_shards(tmp, tensors, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out_dir)


def write_shards(folder: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int) -> list[Path]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = []
    current: dict[str, torch.Tensor] = {}
    size, total, paths = 0, 0, []
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        total += nbytes
        if current and size + nbytes > max_shard_bytes:
            paths.append(_save(folder, len(paths), current, save_file))
            shards.append({k: None for k in current})
            current, size = {}, 0
        current[name] = t.contiguous()
        size += nbytes
    if current or not paths:
        paths.append(_save(folder, len(paths), current, save_file))
        shards.append({k: None for k in current})
    return _name_shards(folder, paths, shards, total)


def _save(folder: Path, i: int, tensors: dict, save_file) -> Path:
    path = folder / f"shard-{i}.partial"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def _name_shards(folder: Path, paths: list[Path], shards: list[dict], total: int) -> list[Path]:
    if len(paths) == 1:
        final = folder / "model.safetensors"
        paths[0].rename(final)
        return [final]
    n, weight_map, finals = len(paths), {}, []
    for i, (path, names) in enumerate(zip(paths, shards)):
        final = folder / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        path.rename(final)
        finals.append(final)
        weight_map.update({name: final.name for name in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return finals


def publish(tmp: Path, out_dir: Path) -> None:
    """Rename a filled sibling folder into place; an existing OUT_DIR (callers checked overwrite) is moved
    aside first and removed last, so OUT_DIR is always either the old folder or the complete new one."""
    _make_readable(tmp)
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _make_readable(folder: Path) -> None:
    """mkdtemp creates 0700; give the published folder the permissions of an ordinary one."""
    umask = _umask()
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


def _umask() -> int:
    import os

    current = os.umask(0)
    os.umask(current)
    return current
