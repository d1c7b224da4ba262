"""The engine on the real SmolLM2: greedy parity with transformers, batching, stops, streaming, abort."""

import pytest
import torch

from lowbit.api import load
from lowbit.engine.engine import Engine, EngineConfig
from lowbit.engine.request import FinishReason
from lowbit.engine.sampling import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,"]
GREEDY = SamplingParams(temperature=0, max_new_tokens=24)


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return load(str(smollm2_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def hf(smollm2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


def engine(smol, max_batch=1, max_seq_len=256, **config):
    return Engine(smol.model, smol.tokenizer, EngineConfig(max_batch=max_batch, max_seq_len=max_seq_len, **config))


def test_greedy_matches_transformers_generate(smol, hf):
    ids = smol.tokenizer.encode(PROMPTS[0], add_bos=True)
    expected = hf.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    [(_, got, reason)] = engine(smol).generate([ids], SamplingParams(temperature=0, max_new_tokens=48,
                                                                      ignore_eos=True))
    assert got == expected
    assert reason == FinishReason.LENGTH


def test_prompt_of_several_prefill_chunks_matches_transformers(smol, hf, prose):
    """A 1100-token prompt goes in as chunks of 512, 512 and 76: transformers' greedy tokens."""
    ids = smol.tokenizer.encode(prose, add_bos=True)[:1100]
    expected = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    [(_, got, _)] = engine(smol, max_seq_len=1200, prefill_chunk=512).generate([ids], SamplingParams(temperature=0, max_new_tokens=12,
                                                                                  ignore_eos=True))
    assert got == expected


def test_batch_of_different_lengths_equals_solo_runs(smol):
    prompts = [smol.tokenizer.encode(p, add_bos=True) for p in PROMPTS]
    solo = [engine(smol).generate([p], GREEDY)[0] for p in prompts]
    together = engine(smol, max_batch=3).generate(prompts, GREEDY)
    assert [t[1] for t in together] == [s[1] for s in solo]
    assert [t[0] for t in together] == [s[0] for s in solo]


def test_more_requests_than_slots_queue_and_finish(smol):
    prompts = [smol.tokenizer.encode(p, add_bos=True) for p in PROMPTS * 2]
    eng = engine(smol, max_batch=2)
    results = eng.generate(prompts, SamplingParams(temperature=0, max_new_tokens=6))
    assert [r[1] for r in results[:3]] == [r[1] for r in results[3:]]
    assert eng.cache.num_free == 2 and eng.num_unfinished == 0


def test_stream_deltas_join_to_the_decoded_text(smol):
    ids = smol.tokenizer.encode(PROMPTS[2], add_bos=True)
    deltas, tokens = [], []
    for out in engine(smol).stream(ids, SamplingParams(temperature=0.8, seed=3, max_new_tokens=40)):
        deltas.append(out.delta_text)
        tokens += out.new_token_ids
    assert "".join(deltas) == smol.tokenizer.decode(tokens)


def test_stop_string_cuts_the_text(smol):
    ids = smol.tokenizer.encode(PROMPTS[0], add_bos=True)
    full, _, _ = engine(smol).generate([ids], GREEDY)[0]
    stop = full.strip().split()[1]  # a word the model is about to write
    text, _, reason = engine(smol).generate([ids], SamplingParams(temperature=0, max_new_tokens=24, stop=(stop,)))[0]
    assert reason == FinishReason.STOP
    assert stop not in text and full.startswith(text)


def test_eos_stops_generation(smol):
    ids = smol.tokenizer.encode(PROMPTS[0], add_bos=True)
    _, tokens, _ = engine(smol).generate([ids], SamplingParams(temperature=0, max_new_tokens=8))[0]
    eos_after_first = SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=(tokens[1],))
    _, got, reason = engine(smol).generate([ids], eos_after_first)[0]
    assert reason == FinishReason.STOP and got == tokens[:1]


def test_seeded_sampling_is_reproducible(smol):
    ids = smol.tokenizer.encode(PROMPTS[2], add_bos=True)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_new_tokens=16)
    a = engine(smol).generate([ids], params)[0][1]
    b = engine(smol, max_batch=2).generate([ids, ids[:5]], params)[0][1]
    assert a == b


def test_abort_frees_the_slot(smol):
    eng = engine(smol, max_batch=1)
    rid = eng.add_request(smol.tokenizer.encode(PROMPTS[0], add_bos=True), GREEDY)
    eng.step()
    eng.abort(rid)
    assert eng.cache.num_free == 1 and eng.num_unfinished == 0


def test_context_limit_finishes_with_length(smol):
    ids = smol.tokenizer.encode(PROMPTS[0], add_bos=True)
    eng = engine(smol, max_seq_len=len(ids) + 3)
    _, tokens, reason = eng.generate([ids], SamplingParams(temperature=0, max_new_tokens=50, ignore_eos=True))[0]
    assert reason == FinishReason.LENGTH and len(tokens) == 3


def test_prompt_too_long_is_refused(smol):
    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError, match="context"):
        engine(smol, max_seq_len=4).add_request(list(range(10)), GREEDY)
