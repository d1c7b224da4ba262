"""Whole quantization runs in tests: a tiny random LLaMA folder with a character tokenizer, calibration tokens,
and fixtures (import them into a test module): `one_thread` (tiny matmuls on a shared 2-core machine run
many times faster on one torch thread) and `tiny_model`."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch

from lowbit.config import CalibrationConfig
from tests.conftest import tiny_config, write_hf_checkpoint

VOCAB = 96
# intermediate 80: gate/up have out_features that are not a multiple of 32 (padded qzeros words) and
# down_proj has a partial last group at group size 32
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=80, num_hidden_layers=2)
CALIB = CalibrationConfig(dataset="unused: tokens are given", nsamples=8, seqlen=32)


def write_tokenizer(folder: Path) -> None:
    """A character-level tokenizer (ids < 60) saved as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_letters + string.digits[:3] + " .,\n'"
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(dict.fromkeys(chars))}}
    assert len(vocab) <= VOCAB
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)


def write_tiny_model(folder: Path, seed: int = 0, tokenizer: bool = True, **overrides) -> Path:
    write_hf_checkpoint(folder, tiny_config(**{**TINY, **overrides}), seed=seed)
    if tokenizer:
        write_tokenizer(folder)
    return folder


def calib_tokens(n: int = CALIB.nsamples, seqlen: int = CALIB.seqlen, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A float tiny model folder shared by a module's tests (read-only: copy it before changing it)."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "float")
