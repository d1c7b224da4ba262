"""Where a model's files come from: a local folder or file, or a Hub id `org/name[:branch]`.

Resolves a user's MODEL argument to a local folder (downloading through huggingface_hub, or reading its
cache when offline) and opens the weight files lazily: memory-mapped safetensors shards, pickle only on
request. What the tensors mean is `lowbit.model.weights`' business.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lowbit.errors import FormatError, LowbitError

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(:[\w./-]+)?$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
WEIGHT_INDEX = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.gguf", "*.md"]


def resolve(model: str) -> Path:
    """A local path for MODEL: an existing file or folder, or a Hub id fetched (or found in the HF cache)."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    if not HUB_ID.match(model):
        raise LowbitError(f"{model}: no such file or folder (and not a Hub id like org/name or org/name:branch)")
    repo_id, _, revision = model.partition(":")
    return _snapshot(repo_id, revision or None)


def _snapshot(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=DOWNLOAD_PATTERNS))
    except LocalEntryNotFoundError:
        pass  # offline or the Hub unreachable: fall back to the cache below
    except Exception as e:  # noqa: BLE001 - any Hub failure is reported as one line, then the cache is tried
        log.info("download of %s failed (%s); trying the local HF cache", repo_id, e)
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=DOWNLOAD_PATTERNS,
                                      local_files_only=True))
    except Exception:  # noqa: BLE001
        where = f"{repo_id}@{revision}" if revision else repo_id
        raise LowbitError(
            f"{where} could not be downloaded (offline or unreachable Hub) and is not in the local HF cache"
        ) from None


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LowbitError(f"{path.parent}: missing {path.name}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None


@dataclass
class TensorFiles:
    """Name -> tensor over one or more weight files, read lazily (safetensors are memory-mapped)."""

    files: list[Path]
    _where: dict[str, Path] = field(default_factory=dict)
    _open: dict[Path, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in self.files:
            for name in self._handle(f).keys():
                if name in self._where:
                    raise FormatError(f"tensor {name} appears in both {self._where[name].name} and {f.name}")
                self._where[name] = f

    def _handle(self, f: Path) -> Any:
        if f not in self._open:
            self._open[f] = _open_safetensors(f) if f.suffix == ".safetensors" else _PickleFile(f)
        return self._open[f]

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> Tensor:
        if name not in self._where:
            raise FormatError(f"checkpoint lacks tensor {name}")
        f = self._where[name]
        try:
            return self._handle(f).get_tensor(name)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for short files
            raise FormatError(f"{f}: cannot read tensor {name} (file truncated or corrupt: {e})") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape from the file header, without reading its data."""
        if name not in self._where:
            raise FormatError(f"checkpoint lacks tensor {name}")
        handle = self._handle(self._where[name])
        if isinstance(handle, _PickleFile):
            return tuple(handle.get_tensor(name).shape)
        return tuple(handle.get_slice(name).get_shape())

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def _open_safetensors(f: Path) -> Any:
    from safetensors import safe_open

    try:
        handle = safe_open(str(f), framework="pt", device="cpu")
    except Exception as e:  # noqa: BLE001
        raise FormatError(f"{f}: not a readable safetensors file (truncated or corrupt: {e})") from None
    _check_complete(f, handle)
    return handle


def _check_complete(f: Path, handle: Any) -> None:
    """safetensors memory-maps lazily; check up front that the data section is as long as the header says."""
    with open(f, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if f.stat().st_size < 8 + header_len + end:
        raise FormatError(f"{f}: truncated safetensors file ({f.stat().st_size} bytes, header needs {8 + header_len + end})")


class _PickleFile:
    """A torch.save'd state dict, loaded only after the user opted in (weights_only, memory-mapped)."""

    def __init__(self, f: Path):
        try:
            self._sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001
            raise FormatError(f"{f}: cannot read pickle checkpoint ({e})") from None

    def keys(self) -> list[str]:
        return list(self._sd)

    def get_tensor(self, name: str) -> Tensor:
        return self._sd[name]


def weight_files(folder: Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a checkpoint folder: an index's shards, or every *.safetensors it holds."""
    for index_name in WEIGHT_INDEX:
        index = folder / index_name
        if index.exists():
            names = sorted(set(read_json(index).get("weight_map", {}).values()))
            files = [folder / n for n in names]
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise LowbitError(f"{folder}: shards listed in {index_name} are missing: {', '.join(missing)}")
            return _refuse_pickle(files, allow_pickle)
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(f for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if pickles:
        return _refuse_pickle(pickles, allow_pickle)
    raise LowbitError(f"{folder}: no weights found (no *.safetensors, no index, no .bin)")


def _refuse_pickle(files: list[Path], allow_pickle: bool) -> list[Path]:
    if any(f.suffix in PICKLE_SUFFIXES for f in files) and not allow_pickle:
        raise LowbitError(
            f"{files[0].parent}: weights are pickle files ({files[0].name}), which can run code when loaded; "
            "pass --allow-pickle (allow_pickle=True) if you trust them, or convert them to safetensors"
        )
    return files
