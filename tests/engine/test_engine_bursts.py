"""Bursts of greedy decode steps (EngineConfig.decode_steps) against one step per token, on the CPU through
the eager burst runner (the loop the CUDA graphs capture): the same tokens, text and finish reasons with stop
ids and stop strings hit mid-burst, budgets that are not a multiple of S, rows of different lengths, slots
reused, the context's end; and the penalty history holding exactly the kept tokens."""

import pytest
import torch

from lowbit.api import load
from lowbit.engine.engine import Engine, EngineConfig
from lowbit.engine.request import FinishReason
from lowbit.engine.sampling import SamplingParams
from lowbit.errors import LowbitError
from tests.chat_model import write_tiny_chat_model

S = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load(str(write_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "m")), device="cpu")


def engine(m, steps: int, **kw) -> Engine:
    return Engine(m.model, m.tokenizer, EngineConfig(**{"max_seq_len": 128, "decode_steps": steps,
                                                        "eager_bursts": True, **kw}))


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 0, "max_new_tokens": n, "ignore_eos": True, **kw})


def run(eng: Engine, jobs: list[tuple[list[int], SamplingParams]]) -> list[tuple[str, list[int], FinishReason, list[int]]]:
    """Every job to the end: (text, token ids, finish reason, new tokens per output) per job, in order."""
    rids = [eng.add_request(p, params) for p, params in jobs]
    got = {rid: ["", [], None, []] for rid in rids}
    while eng.num_unfinished:
        for out in eng.step():
            g = got[out.request_id]
            g[0] += out.delta_text
            g[1] += out.new_token_ids
            g[2] = out.finish_reason
            g[3].append(len(out.new_token_ids))
    assert eng.cache.num_free == eng.config.max_batch and not eng.live
    return [tuple(got[rid]) for rid in rids]


def same_as_single_steps(m, jobs, same_slots=True, **kw):
    """Run the jobs with bursts and with one step per token; assert the same results; return both.

    When every request keeps its slot to the end of the run (same_slots), the penalty history of every slot
    must match too: the bursts recorded exactly the tokens they kept."""
    single = engine(m, 1, **kw)
    burst = engine(m, S, **kw)
    want, got = run(single, jobs), run(burst, jobs)
    assert [g[:3] for g in got] == [w[:3] for w in want]
    if same_slots:
        assert torch.equal(burst.history.counts, single.history.counts)
        assert torch.equal(burst.history.seen, single.history.seen)
    return want, got


def prompt(m, text: str) -> list[int]:
    return m.tokenizer.encode(text, add_bos=True)


def test_a_lone_request_runs_bursts_then_single_steps_for_the_rest(tiny):
    """21 tokens, S=8: the prefill's token, two bursts, then single steps for the 4 a burst would overshoot."""
    _, got = same_as_single_steps(tiny, [(prompt(tiny, "hello there"), greedy(21))])
    assert got[0][3] == [1, 8, 8, 1, 1, 1, 1] and got[0][2] == FinishReason.LENGTH


def test_rows_of_different_lengths_and_budgets_in_one_batch(tiny):
    """Rows join at different positions and want 5, 21 and 13 tokens: rows short of a whole burst finish
    with LENGTH mid-burst while the longest one goes on."""
    jobs = [(prompt(tiny, "a"), greedy(5)), (prompt(tiny, "a much longer prompt than the others"), greedy(21)),
            (prompt(tiny, "medium one"), greedy(13))]
    want, got = same_as_single_steps(tiny, jobs, max_batch=3)
    assert [len(w[1]) for w in want] == [5, 21, 13]
    assert max(max(g[3]) for g in got) == S  # bursts did run


def test_more_requests_than_slots_reuse_slots_written_past_their_end(tiny):
    """A row that finishes mid-burst left keys past its end in its slot; the next request there is unaffected.
    (Requests finish at other steps than with single steps, so they may take other slots: no history check.)"""
    texts = ["one", "two two", "three three three", "four", "five five"]
    jobs = [(prompt(tiny, t), greedy(n)) for t, n in zip(texts, (3, 17, 10, 12, 9))]
    _, got = same_as_single_steps(tiny, jobs, same_slots=False, max_batch=2)
    assert max(max(g[3]) for g in got) == S


def test_stop_ids_hit_mid_burst(tiny):
    ids = prompt(tiny, "stop me")
    [(_, tokens, _, _)] = run(engine(tiny, 1), [(ids, greedy(24))])
    for k in (3, 9, 12):  # inside the first burst (tokens 1-8), the second's first token, inside the second
        stop = tokens[k]
        jobs = [(ids, greedy(24, stop_token_ids=(stop,))), (prompt(tiny, "a neighbour"), greedy(24))]
        want, got = same_as_single_steps(tiny, jobs, max_batch=2)
        assert want[0][2] == FinishReason.STOP and want[0][1] == tokens[:tokens.index(stop)]
        assert len(got[0][3]) <= 3  # the prefill's output and at most two bursts


def test_stop_strings_hit_mid_burst(tiny):
    ids = prompt(tiny, "say something")
    [(text, _, _, _)] = run(engine(tiny, 1), [(ids, greedy(30))])
    for start in (4, 11):
        stop = text[start:start + 2]
        want, got = same_as_single_steps(tiny, [(ids, greedy(30, stop=(stop,)))])
        assert want[0][2] == FinishReason.STOP and want[0][0] == text[:text.find(stop)]
        assert len(got[0][3]) <= 3


@pytest.mark.parametrize("room", [S - 1, S, S + 1, 2 * S + 3])
def test_near_the_context_end(tiny, room):
    """The context ends `room` tokens after the prompt: bursts only while their key writes fit the cache
    (writing past it would raise on the CPU), then single steps to LENGTH."""
    ids = prompt(tiny, "near the end")
    want, _ = same_as_single_steps(tiny, [(ids, greedy(100))], max_seq_len=len(ids) + room)
    assert want[0][2] == FinishReason.LENGTH and len(want[0][1]) == room


def test_a_sampled_row_keeps_the_batch_on_single_steps(tiny):
    jobs = [(prompt(tiny, "greedy"), greedy(12)),
            (prompt(tiny, "sampled"), SamplingParams(temperature=0.8, seed=5, max_new_tokens=12, ignore_eos=True))]
    _, got = same_as_single_steps(tiny, jobs, max_batch=2)
    assert max(max(g[3]) for g in got) == 1
    penalized = [(prompt(tiny, "greedy"), greedy(12, presence_penalty=0.5))]
    _, got = same_as_single_steps(tiny, penalized)
    assert max(got[0][3]) == 1


def test_bursts_are_off_without_a_runner_and_decode_steps_is_checked(tiny):
    eng = Engine(tiny.model, tiny.tokenizer, EngineConfig(max_seq_len=64))  # CPU, no eager_bursts
    assert eng.bursts is None
    assert max(run(eng, [(prompt(tiny, "hi"), greedy(12))])[0][3]) == 1
    with pytest.raises(LowbitError, match="decode_steps"):
        engine(tiny, 0)


@pytest.mark.slow
def test_smollm2_bursts_match_single_steps(smollm2_dir):
    m = load(str(smollm2_dir), device="cpu", dtype="float32")
    texts = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,"]
    want, _ = same_as_single_steps(m, [(prompt(m, t), greedy(n)) for t, n in zip(texts, (19, 26, 11))], max_batch=3)
    stop = want[0][0].split()[2]  # a word the model writes mid-reply
    jobs = [(prompt(m, texts[0]), SamplingParams(temperature=0, max_new_tokens=26, stop=(stop,))),
            (prompt(m, texts[1]), SamplingParams(temperature=0, max_new_tokens=26))]
    want, _ = same_as_single_steps(m, jobs, max_batch=2)
    assert want[0][2] == FinishReason.STOP
