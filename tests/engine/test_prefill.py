"""Chunked prefill against one-shot prefill on a tiny random float32 model (CPU): the last position's logits,
the keys and values left in the cache, and the engine's greedy tokens."""

from __future__ import annotations

import pytest
import torch

from lowbit.config import ModelConfig
from lowbit.engine.cuda_graphs import PaddedPrefill
from lowbit.engine.engine import Engine, EngineConfig
from lowbit.engine.kv_cache import KVCache
from lowbit.engine.prefill import prefill
from lowbit.engine.sampling import SamplingParams
from lowbit.errors import LowbitError
from lowbit.eval.bench import _NullTokenizer
from lowbit.model.llama import Rotary, Transformer

CONFIG = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-5)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(CONFIG).eval()


@pytest.mark.parametrize("n,chunk", [(13, 4), (13, 1), (13, 13), (13, 64), (40, 16)])
def test_chunked_prefill_equals_one_shot(model, n, chunk):
    prompt = torch.randint(0, CONFIG.vocab_size, (n,)).tolist()
    caches = [KVCache(CONFIG, 3, 48, torch.float32, "cpu") for _ in range(2)]
    with torch.inference_mode():
        whole = prefill(model, caches[0], prompt, 1, None, torch.device("cpu"))
        chunked = prefill(model, caches[1], prompt, 1, chunk, torch.device("cpu"))
        want = model(torch.tensor([prompt]))[0, -1]  # no cache at all: causal over the prompt
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(whole, want, rtol=1e-4, atol=1e-5)
    for got, ref in ((caches[1].k, caches[0].k), (caches[1].v, caches[0].v)):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)  # slot 1, positions < n; zeros elsewhere
    assert not caches[1].k[:, :, :, n:].any() and not caches[1].k[:, [0, 2]].any()


def test_engine_greedy_tokens_equal_with_and_without_chunks(model):
    prompts = [torch.randint(0, CONFIG.vocab_size, (n,)).tolist() for n in (23, 5, 17)]
    params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    outs = []
    for chunk in (None, 4, 7):
        engine = Engine(model, _NullTokenizer(), EngineConfig(max_batch=2, max_seq_len=40, prefill_chunk=chunk))
        outs.append([ids for _, ids, _ in engine.generate(prompts, params)])
    assert outs[0] == outs[1] == outs[2]


def test_prefill_chunk_must_be_positive():
    with pytest.raises(LowbitError, match="prefill_chunk"):
        EngineConfig(prefill_chunk=0)
    with pytest.raises(LowbitError, match="prefill_graphs"):
        EngineConfig(prefill_graphs=-1)


def test_logits_of_one_position_a_row(model):
    """last_only as a tensor: each row's logits at its own position, as slicing the whole output gives them."""
    tokens = torch.randint(0, CONFIG.vocab_size, (3, 11))
    at = torch.tensor([10, 0, 6])
    with torch.inference_mode():
        whole = model(tokens)
        for cache in (None, KVCache(CONFIG, 3, 16, torch.float32, "cpu")):
            got = model(tokens, None, cache, None if cache is None else torch.arange(3), last_only=at)
            torch.testing.assert_close(got[:, 0], whole[torch.arange(3), at], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n", [1, 13, 16, 17, 32])
def test_padded_prefill_equals_prefill(model, n):
    """A prompt padded to a power of two (what a prefill graph replays): the prompt's last logits and its keys and
    values equal the unpadded prefill's; the padding writes only past the prompt, in the prompt's slot."""
    prompt = torch.randint(0, CONFIG.vocab_size, (n,)).tolist()
    caches = [KVCache(CONFIG, 3, 48, torch.float32, "cpu") for _ in range(2)]
    padded = PaddedPrefill(model, caches[0], max_tokens=32)
    length = padded.padded_length(n)
    assert length == max(16, 1 << (n - 1).bit_length())
    with torch.inference_mode():
        got = padded.run(prompt, 1)
        want = prefill(model, caches[1], prompt, 1, None, torch.device("cpu"))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for a, b in ((caches[0].k, caches[1].k), (caches[0].v, caches[1].v)):
        torch.testing.assert_close(a[:, :, :, :n], b[:, :, :, :n], rtol=1e-4, atol=1e-5)
        assert a[:, 1, :, n:length].any() == (length > n) and not a[:, 1, :, length:].any() and not a[:, [0, 2]].any()


def test_padded_prefill_takes_only_what_fits():
    """Longer than max_tokens, or padded past the cache: None (`prefill` takes those prompts)."""
    cache = KVCache(CONFIG, 1, 40, torch.float32, "cpu")
    padded = PaddedPrefill(None, cache, max_tokens=64)
    assert padded.padded_length(20) == 32 and padded.padded_length(33) is None  # 64 > the cache's 40
    assert PaddedPrefill(None, cache, max_tokens=16).padded_length(17) is None
    assert padded.run(list(range(33)), 0) is None


def test_engine_greedy_tokens_equal_with_padded_prefill(model):
    """The engine with short prompts padded (eagerly here; CUDA replays them from graphs): the same tokens."""
    prompts = [torch.randint(0, CONFIG.vocab_size, (n,)).tolist() for n in (23, 5, 17)]
    params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    outs = []
    for short in (0, 20, 32):  # 20: the 23-token prompt goes the unpadded way
        config = EngineConfig(max_batch=2, max_seq_len=40, prefill_graphs=short, eager_bursts=True)
        engine = Engine(model, _NullTokenizer(), config)
        assert (engine.padded is None) == (short == 0)
        outs.append([ids for _, ids, _ in engine.generate(prompts, params)])
    assert outs[0] == outs[1] == outs[2]


@pytest.mark.gpu
def test_gpu_chunked_prefill_matches_the_float32_cpu_reference(model):
    """On CUDA the first chunk takes flash attention, later ones SDPA with a mask over the cache (float16)."""
    fast = Transformer(CONFIG).eval()
    fast.load_state_dict(model.state_dict())
    fast = fast.to("cuda", torch.float16)
    fast.rotary = Rotary(CONFIG).to("cuda")  # float32 frequencies, as the loader keeps them
    prompt = torch.randint(0, CONFIG.vocab_size, (45,)).tolist()
    with torch.inference_mode():
        want = model(torch.tensor([prompt]))[0, -1]
        for chunk in (None, 16, 7):
            cache = KVCache(CONFIG, 2, 48, torch.float16, "cuda")
            got = prefill(fast, cache, prompt, 1, chunk, torch.device("cuda"))
            torch.testing.assert_close(got.float().cpu(), want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))
