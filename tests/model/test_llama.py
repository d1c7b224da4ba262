"""Logits parity with transformers' LlamaForCausalLM on the same weights (float32, CPU)."""

import pytest
import torch

from lowbit.engine.kv_cache import KVCache
from lowbit.model.weights import load_model

VARIANTS = {
    "mha": {},
    "gqa": dict(num_attention_heads=8, num_key_value_heads=2),
    "mqa_bias": dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True),
    "tied": dict(tie_word_embeddings=True),
    "head_dim": dict(head_dim=32, num_attention_heads=4, num_key_value_heads=2),
    "rope_linear": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "rope_dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=16),
    "rope_llama3": dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(hf_checkpoint, variant):
    folder, hf = hf_checkpoint(**VARIANTS[variant])
    model, _ = load_model(folder)
    tokens = torch.randint(0, 96, (2, 40))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = model(tokens)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["gqa", "rope_dynamic", "tied"])
def test_cached_decode_matches_full_forward(hf_checkpoint, variant):
    """Prefill + token-by-token decode through our KV cache equals transformers' own cached decode
    (for dynamic NTK rope, frequencies change as the sequence grows, so only the incremental oracle is right)."""
    folder, hf = hf_checkpoint(**VARIANTS[variant])
    model, ckpt = load_model(folder)
    tokens = torch.randint(0, 96, (1, 24))
    cache = KVCache(ckpt.config, num_slots=3, max_seq_len=32, dtype=torch.float32, device="cpu")
    rows = torch.tensor([1])
    with torch.no_grad():
        out = hf(tokens[:, :10], use_cache=True)
        expected, past = [out.logits], out.past_key_values
        for t in range(10, 24):
            out = hf(tokens[:, t:t + 1], past_key_values=past, use_cache=True)
            expected.append(out.logits)
            past = out.past_key_values
        expected = torch.cat(expected, dim=1)
        steps = [model(tokens[:, :10], torch.arange(10)[None], cache, rows)]
        for t in range(10, 24):
            steps.append(model(tokens[:, t:t + 1], torch.tensor([[t]]), cache, rows))
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=1e-4, rtol=0)


def test_rows_at_different_lengths_decode_together(hf_checkpoint):
    """Two sequences of different lengths in different slots decode in one batched step."""
    folder, hf = hf_checkpoint(num_attention_heads=8, num_key_value_heads=2)
    model, ckpt = load_model(folder)
    a, b = torch.randint(0, 96, (1, 7)), torch.randint(0, 96, (1, 12))
    cache = KVCache(ckpt.config, num_slots=2, max_seq_len=16, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        model(a[:, :-1], torch.arange(6)[None], cache, torch.tensor([0]))
        model(b[:, :-1], torch.arange(11)[None], cache, torch.tensor([1]))
        step = model(torch.cat([a[:, -1:], b[:, -1:]]), torch.tensor([[6], [11]]), cache, None)
        torch.testing.assert_close(step[0, -1], hf(a).logits[0, -1], atol=1e-4, rtol=0)
        torch.testing.assert_close(step[1, -1], hf(b).logits[0, -1], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    model, _ = load_model(smollm2_dir)
    tokens = torch.randint(0, 49152, (1, 64))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rope", [{}, {"kind": "linear", "factor": 2.0},
                                  {"kind": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}])
def test_rope_table_gives_the_computed_cos_sin(dtype, rope):
    """A cache's decode reads cos/sin from a table of the cache's positions: the same bits as computing them."""
    from dataclasses import replace

    from lowbit.config import ModelConfig, RopeConfig
    from lowbit.model.llama import Rotary

    config = ModelConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                         num_kv_heads=2, head_dim=16, max_position_embeddings=512, rope=replace(RopeConfig(), **rope))
    rotary = Rotary(config)
    pos = torch.tensor([[0, 5, 511], [300, 2, 77]])
    table_cos, table_sin = rotary(pos, dtype, limit=512)
    cos, sin = rotary(pos, dtype)
    assert table_cos.shape == cos.shape == (2, 3, 16) and table_cos.dtype == dtype
    assert torch.equal(table_cos, cos) and torch.equal(table_sin, sin)
    assert table_cos.stride() == table_sin.stride() and table_cos.stride(-1) == 1  # what the rope kernels take
    assert len(rotary._tables) == 1  # built once, kept
