"""Calibration and evaluation text: named data sets (wikitext2, c4) or local files -> texts -> token tensors.

Owns reading text (the Hub through the optional `datasets` package; .txt, .jsonl, .parquet files, folders
and globs), the GPTQ paper's token protocols (random calibration windows, one joined evaluation stream)
and the project's quality split of the Python docs. Leaves perplexity to `eval.perplexity` and the
calibration loop to `quant.calibrate`.
"""

from __future__ import annotations

import glob
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from lowbit.chat.template import from_tokenizer_config
from lowbit.errors import LowbitError
from lowbit.model.tokenizer import Tokenizer

SEPARATOR = "\n\n"  # between texts, as the GPTQ paper joins wikitext2's test split
DOCS_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
LOCAL_ALTERNATIVE = "pass a local .txt/.jsonl/.parquet file instead"
C4_SHARDS = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
C4_DOCUMENTS = {"train": 5000, "validation": 1100}  # validation: the GPTQ paper's first 1100 documents


# ---- texts ----

def load_texts(spec: str, split: str = "train", tokenizer: Tokenizer | None = None) -> list[str]:
    """The texts that `spec` names: `wikitext2`, `c4`, a file, a folder of .txt files, or a glob.

    `split` picks the Hub data set's split (wikitext2: train / validation / test; c4: train / validation)
    and is ignored for local files. `tokenizer` renders .jsonl chat `messages` with its chat template.
    """
    if spec in HUB_SETS and not Path(spec).exists():
        return HUB_SETS[spec](split)
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        return _nonempty(spec, [t for f in files for t in _read_file(f, tokenizer)])
    path = Path(spec)
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        return _nonempty(spec, [t for f in files for t in _read_file(f, tokenizer)])
    if not path.exists():
        raise LowbitError(f"{spec}: no such file or folder (data sets: {', '.join(HUB_SETS)}; or {LOCAL_ALTERNATIVE})")
    return _nonempty(spec, _read_file(path, tokenizer))


def python_docs_split(root: Path = DOCS_ROOT) -> tuple[list[str], list[str]]:
    """The project's quality split: (calibration, evaluation) = the library docs, the language reference."""
    if not root.is_dir():
        raise LowbitError(f"{root}: not found; install the Debian package python3.11-doc")
    calibration = [_read_text(f) for f in sorted(root.glob("library/**/*.rst.txt"))]
    evaluation = [_read_text(f) for f in sorted(root.glob("reference/**/*.rst.txt"))]
    return _nonempty(f"{root}/library", calibration), _nonempty(f"{root}/reference", evaluation)


def _nonempty(where: str, texts: list[str]) -> list[str]:
    if not any(t.strip() for t in texts):
        raise LowbitError(f"{where}: no text found")
    return texts


def _read_file(path: Path, tokenizer: Tokenizer | None) -> list[str]:
    readers = {".txt": lambda p, _: [_read_text(p)], ".jsonl": _read_jsonl, ".parquet": lambda p, _: _read_parquet(p)}
    if path.suffix not in readers:
        raise LowbitError(f"{path}: unsupported file type; use .txt, .jsonl, .parquet or a folder of .txt files")
    return readers[path.suffix](path, tokenizer)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LowbitError(f"{path}: not UTF-8 text (byte {e.start})") from e


def _read_jsonl(path: Path, tokenizer: Tokenizer | None) -> list[str]:
    """One text per line: {"text": ...}, or {"messages": [...]} rendered with the tokenizer's chat template."""
    texts = []
    for n, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LowbitError(f"{path} line {n}: not valid JSON ({e.msg})") from e
        try:
            texts.append(_record_text(record, tokenizer))
        except LowbitError as e:
            raise LowbitError(f"{path} line {n}: {e}") from e
    return texts


def _record_text(record, tokenizer: Tokenizer | None) -> str:
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    if not (isinstance(record, dict) and isinstance(record.get("messages"), list)):
        raise LowbitError('expected a JSON object with a "text" string or a "messages" list')
    if tokenizer is None:
        raise LowbitError("chat messages need a model's tokenizer to render them with its chat template")
    template = from_tokenizer_config(tokenizer.chat_template, tokenizer.special_tokens)
    return template.render(record["messages"], add_generation_prompt=False)


def _read_parquet(path: Path) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise LowbitError(f"{path}: reading .parquet needs the `pyarrow` package (pip install pyarrow)") from e
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise LowbitError(f"{path}: not a readable parquet file ({_first_line(e)})") from e
    if "text" not in table.column_names:
        raise LowbitError(f"{path}: no `text` column (columns: {', '.join(table.column_names)})")
    return [t for t in table.column("text").to_pylist() if isinstance(t, str)]


# ---- the Hugging Face Hub, through the optional `datasets` package ----

def _hub_dataset(name: str, split: str, load: Callable) -> list[str]:
    """Texts from `load(load_dataset)`; LowbitError naming the local-file alternative when that fails."""
    needs = f"{name} needs the `datasets` package and access to the Hugging Face Hub"
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise LowbitError(f"{needs}; {LOCAL_ALTERNATIVE}") from e
    try:
        texts = load(load_dataset)
    except Exception as e:  # network, auth, cache and format errors come from several libraries
        raise LowbitError(f"{needs} ({type(e).__name__}: {_first_line(e)}); {LOCAL_ALTERNATIVE}") from e
    return _nonempty(f"{name} {split}", list(texts))


def _wikitext2(split: str) -> list[str]:
    def load(load_dataset):
        ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        return ds[: len(ds)]["text"]

    return _hub_dataset("wikitext2", split, load)


def _c4(split: str) -> list[str]:
    """The GPTQ paper's `get_c4` shards; the first C4_DOCUMENTS[split] documents of each."""
    if split not in C4_SHARDS:
        raise LowbitError(f"c4 has no split {split!r}; choose {', '.join(C4_SHARDS)}")

    def load(load_dataset):
        ds = load_dataset("allenai/c4", data_files={split: C4_SHARDS[split]}, split=split)
        return ds[: min(len(ds), C4_DOCUMENTS[split])]["text"]

    return _hub_dataset("c4", split, load)


HUB_SETS: dict[str, Callable[[str], list[str]]] = {"wikitext2": _wikitext2, "c4": _c4}


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0]


# ---- token tensors ----

def encode_long(tokenizer: Tokenizer, text: str, add_bos: bool = False) -> list[int]:
    """Token ids of one long text in one pass (the Rust tokenizer directly: no length warning, ~1 MB/s)."""
    backend = getattr(tokenizer.hf, "backend_tokenizer", None)
    if backend is None:
        return tokenizer.encode(text, add_bos=add_bos)
    ids = backend.encode(text, add_special_tokens=add_bos).ids
    bos = tokenizer.bos_id
    return ids[1:] if add_bos and bos is not None and ids[:2] == [bos, bos] else ids


def calibration_windows(tokenizer: Tokenizer, texts: Sequence[str], nsamples: int = 128, seqlen: int = 2048,
                        seed: int = 0) -> torch.Tensor:
    """[nsamples, seqlen] int64: random windows of the joined, once-tokenized texts (no BOS added).

    The GPTQ paper's protocol: start offsets `random.Random(seed).randint(0, N - seqlen - 1)`, so the same
    seed draws the same windows as its `random.seed(seed)`; windows may overlap.
    """
    if nsamples < 1 or seqlen < 1:
        raise LowbitError(f"nsamples and seqlen must be positive, got {nsamples} and {seqlen}")
    ids = encode_long(tokenizer, SEPARATOR.join(texts), add_bos=False)
    if len(ids) < seqlen + 1:
        raise LowbitError(f"the calibration text has {len(ids)} tokens; windows of seqlen {seqlen} need "
                          f"at least {seqlen + 1}")
    stream = torch.tensor(ids, dtype=torch.long)
    rng = random.Random(seed)
    starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([stream[i : i + seqlen] for i in starts])


def eval_tokens(tokenizer: Tokenizer, texts: Sequence[str], add_bos: bool = True) -> torch.Tensor:
    """[1, N] int64: the texts joined with blank lines, tokenized once (BOS first, as the GPTQ paper's
    `tokenizer("\\n\\n".join(texts))` gives it for LLaMA)."""
    ids = encode_long(tokenizer, SEPARATOR.join(texts), add_bos=add_bos)
    if not ids:
        raise LowbitError("no evaluation text to tokenize")
    return torch.tensor([ids], dtype=torch.long)
