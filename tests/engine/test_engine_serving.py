"""What serving needs from the engine, on a tiny random chat model: overload and queue timeouts, abort freeing
the slot at once, per-request seeds independent of the batch, OpenAI penalties against a no-cache reference,
and token counts."""

import time

import pytest
import torch

from lowbit.api import load
from lowbit.engine.engine import Engine, EngineConfig
from lowbit.engine.request import FinishReason
from lowbit.engine.sampling import SamplingParams
from lowbit.errors import Overloaded
from tests.chat_model import write_tiny_chat_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load(str(write_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "m")), device="cpu")


def engine(tiny, **kw):
    return Engine(tiny.model, tiny.tokenizer, EngineConfig(**{"max_seq_len": 128, **kw}))


def prompt(tiny, text="hello there"):
    return tiny.tokenizer.encode(text, add_bos=True)


def run(eng, rids):
    """Step until the given requests finish: {rid: (token ids, finish reason)}."""
    got = {rid: ([], None) for rid in rids}
    while any(got[r][1] is None for r in rids):
        for out in eng.step():
            if out.request_id in got:
                ids, _ = got[out.request_id]
                got[out.request_id] = (ids + list(out.new_token_ids), out.finish_reason)
    return got


def test_full_queue_raises_overloaded(tiny):
    eng = engine(tiny, max_batch=1, max_waiting=1)
    eng.add_request(prompt(tiny), SamplingParams(max_new_tokens=4))
    with pytest.raises(Overloaded, match="waiting"):
        eng.add_request(prompt(tiny), SamplingParams(max_new_tokens=4))
    eng.step()  # the first request takes the slot, the queue empties
    eng.add_request(prompt(tiny), SamplingParams(max_new_tokens=4))


def test_request_that_waits_too_long_times_out_and_the_rest_continue(tiny):
    eng = engine(tiny, max_batch=1, max_wait_s=0.05)
    a = eng.add_request(prompt(tiny), SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True))
    eng.step()
    b = eng.add_request(prompt(tiny), SamplingParams(max_new_tokens=4))
    time.sleep(0.1)
    outs = eng.step()
    timed_out = [o for o in outs if o.request_id == b]
    assert timed_out and timed_out[0].finish_reason == FinishReason.TIMEOUT and timed_out[0].num_output_tokens == 0
    assert run(eng, [a])[a][1] == FinishReason.LENGTH
    assert eng.num_unfinished == 0 and eng.cache.num_free == 1


def test_abort_frees_the_slot_at_once(tiny):
    eng = engine(tiny, max_batch=2)
    rids = [eng.add_request(prompt(tiny), SamplingParams(max_new_tokens=50)) for _ in range(3)]
    eng.step()
    assert eng.cache.num_free == 0 and eng.num_waiting == 1
    eng.abort(rids[0])
    assert eng.cache.num_free == 1 and eng.num_unfinished == 2
    outs = eng.step()  # the waiting request takes the freed slot in the very next step
    assert {o.request_id for o in outs} == {rids[1], rids[2]}
    for rid in rids[1:]:
        eng.abort(rid)
    assert eng.num_unfinished == 0 and eng.cache.num_free == 2 and not eng.live


def test_seeded_request_draws_the_same_tokens_alone_and_in_a_batch(tiny):
    params = SamplingParams(temperature=1.0, seed=1234, max_new_tokens=20, ignore_eos=True)
    alone = engine(tiny, max_batch=1)
    rid = alone.add_request(prompt(tiny), params)
    solo = run(alone, [rid])[rid][0]
    busy = engine(tiny, max_batch=4)
    others = [busy.add_request(prompt(tiny, t), SamplingParams(temperature=1.0, max_new_tokens=30))
              for t in ("a", "bb", "ccc")]
    busy.step()
    rid = busy.add_request(prompt(tiny), params)  # joins a running batch mid-way
    assert run(busy, [rid])[rid][0] == solo
    other_seed = engine(tiny, max_batch=1)
    rid2 = other_seed.add_request(prompt(tiny), SamplingParams(temperature=1.0, seed=99, max_new_tokens=20,
                                                              ignore_eos=True))
    assert run(other_seed, [rid2])[rid2][0] != solo
    assert others  # the batch really was busy


@torch.inference_mode()
def reference_penalized_greedy(model, ids, n, presence, frequency):
    """Greedy decoding by full forward passes without a cache, applying OpenAI penalties by hand."""
    ids, counts = list(ids), torch.zeros(model.config.vocab_size)
    out = []
    for _ in range(n):
        logits = model(torch.tensor([ids]))[0, -1].float()
        logits = logits - frequency * counts - presence * (counts > 0).float()
        token = int(logits.argmax())
        counts[token] += 1
        ids.append(token)
        out.append(token)
    return out


def test_penalties_match_a_no_cache_reference_with_slot_reuse(tiny):
    eng = engine(tiny, max_batch=2)
    warm = eng.add_request(prompt(tiny, "warm up the slot"), SamplingParams(temperature=0, max_new_tokens=12,
                                                                             ignore_eos=True))
    run(eng, [warm])  # leaves counts behind in a slot that the next request reuses
    p = SamplingParams(temperature=0, presence_penalty=0.7, frequency_penalty=1.3, max_new_tokens=16, ignore_eos=True)
    rid = eng.add_request(prompt(tiny), p)
    got = run(eng, [rid])[rid][0]
    assert got == reference_penalized_greedy(tiny.model, prompt(tiny), 16, 0.7, 1.3)
    plain = eng.add_request(prompt(tiny), SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True))
    assert run(eng, [plain])[plain][0] == reference_penalized_greedy(tiny.model, prompt(tiny), 16, 0.0, 0.0)


def test_outputs_carry_usage_counts(tiny):
    eng = engine(tiny, max_batch=1)
    ids = prompt(tiny, "count me")
    rid = eng.add_request(ids, SamplingParams(max_new_tokens=5, ignore_eos=True))
    outs = []
    while eng.num_unfinished:
        outs += eng.step()
    assert [o.num_output_tokens for o in outs] == [1, 2, 3, 4, 5]
    assert all(o.num_prompt_tokens == len(ids) for o in outs) and outs[-1].request_id == rid
