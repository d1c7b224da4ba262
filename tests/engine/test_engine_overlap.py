"""Pipelined bursts (EngineConfig.overlap_bursts) on the CPU through the eager burst runner: the next burst is
launched, fed the last argmax on the device, before the host applies this one. Against bursts one at a time
and against one step per token: the same tokens, text and finish reasons, the same outputs per step, and the
same penalty history, with stop ids and strings hit mid-burst, budgets that are not a multiple of S, a
request joining and an abort while a burst is pending, and the context's end."""

import pytest
import torch

from lowbit.api import load
from lowbit.engine.engine import Engine, EngineConfig
from lowbit.engine.request import FinishReason
from lowbit.engine.sampling import SamplingParams
from tests.chat_model import write_tiny_chat_model

S = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load(str(write_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "m")), device="cpu")


def engine(m, steps: int = S, overlap: bool = True, **kw) -> Engine:
    """An engine whose `fed` lists, per burst launched, whether its tokens came from the device (overlap)."""
    config = EngineConfig(**{"max_seq_len": 128, "decode_steps": steps, "eager_bursts": True,
                             "overlap_bursts": overlap, **kw})
    eng = Engine(m.model, m.tokenizer, config)
    eng.fed = []
    run = eng.bursts.run

    def counted(tokens, *args):
        eng.fed.append(isinstance(tokens, torch.Tensor))
        return run(tokens, *args)

    eng.bursts.run = counted
    return eng


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 0, "max_new_tokens": n, "ignore_eos": True, **kw})


def prompt(m, text: str) -> list[int]:
    return m.tokenizer.encode(text, add_bos=True)


class Log:
    """Every output per request: text, token ids, finish reason, new tokens per output."""

    def __init__(self):
        self.got: dict[str, list] = {}

    def add(self, outputs) -> None:
        for out in outputs:
            g = self.got.setdefault(out.request_id, ["", [], None, []])
            assert g[2] is None, "an output after the request finished"
            g[0] += out.delta_text
            g[1] += out.new_token_ids
            g[2] = out.finish_reason
            g[3].append(len(out.new_token_ids))

    def result(self, rids) -> list[tuple]:
        return [tuple(self.got[r]) for r in rids]


def run(eng: Engine, jobs, events=None) -> list[tuple]:
    """Every job to the end; events {step number: f(engine, log)} run between steps (adds, aborts)."""
    log, rids, events, n = Log(), [eng.add_request(p, params) for p, params in jobs], dict(events or {}), 0
    while eng.num_unfinished or events:
        if n in events:
            rids += events.pop(n)(eng, log) or []
        log.add(eng.step())
        n += 1
    assert eng.cache.num_free == eng.config.max_batch and not eng.live and eng._pending is None
    return log.result(rids)


def three_ways(m, jobs, events=None, same_steps=True, **kw):
    """Single steps, bursts one at a time, pipelined bursts: the same tokens, text and finish reasons; the
    pipelined engine returns the same outputs per step as bursts one at a time (same_steps), and every slot's
    penalty history matches. Returns the single-step results and the pipelined engine."""
    engines = [engine(m, 1, **kw), engine(m, S, overlap=False, **kw), engine(m, S, **kw)]
    single, serial, piped = (run(e, jobs, events) for e in engines)
    assert [r[:3] for r in serial] == [r[:3] for r in single] == [r[:3] for r in piped]
    if same_steps:
        assert [r[3] for r in piped] == [r[3] for r in serial]
    for e in engines[1:]:
        assert torch.equal(e.history.counts, engines[0].history.counts)
        assert torch.equal(e.history.seen, engines[0].history.seen)
    assert not any(engines[1].fed)
    return single, engines[2]


def test_requests_of_different_lengths_and_budgets(tiny):
    """Budgets 60, 45 and 5 (not multiples of S): rows leave with LENGTH; bursts overlap while every row
    wants another whole one after the burst in flight."""
    jobs = [(prompt(tiny, "a much longer prompt than the others"), greedy(60)), (prompt(tiny, "medium"), greedy(45)),
            (prompt(tiny, "a"), greedy(5))]
    single, eng = three_ways(tiny, jobs, max_batch=3)
    assert [len(r[1]) for r in single] == [60, 45, 5]
    assert eng.fed.count(True) >= 3
    lone = engine(tiny)
    [(_, _, _, steps)] = run(lone, [(prompt(tiny, "alone"), greedy(37))])
    assert steps == [1, 8, 8, 8, 8, 1, 1, 1, 1]
    assert lone.fed == [False, True, True, True]  # the last burst wanted 12 more tokens: not launched ahead


@pytest.mark.parametrize("k", [3, 9, 17, 20])
def test_a_stop_id_mid_burst(tiny, k):
    """The k-th token is a stop id: in the first burst (its successor already launched), or in a burst that
    was itself launched ahead; the neighbour keeps decoding, the stopped row's launched tokens are dropped."""
    ids = prompt(tiny, "stop me")
    [(_, tokens, _, _)] = run(engine(tiny, 1), [(ids, greedy(40))])
    stop = tokens[k]
    jobs = [(ids, greedy(40, stop_token_ids=(stop,))), (prompt(tiny, "a neighbour"), greedy(40))]
    single, eng = three_ways(tiny, jobs, max_batch=2)
    assert single[0][2] == FinishReason.STOP and single[0][1] == tokens[:tokens.index(stop)]
    assert any(eng.fed)


def test_a_stop_string_mid_burst(tiny):
    ids = prompt(tiny, "say something")
    [(text, _, _, _)] = run(engine(tiny, 1), [(ids, greedy(40))])
    for start in (5, 19):
        stop = text[start:start + 2]
        single, _ = three_ways(tiny, [(ids, greedy(40, stop=(stop,)))])
        assert single[0][2] == FinishReason.STOP and single[0][0] == text[:text.find(stop)]


def test_a_request_added_while_a_burst_is_pending(tiny):
    """The pending burst lands (its rows' tokens, nothing launched), then the newcomer joins."""
    seen = {}

    def join(eng, log):
        seen.setdefault(eng.config.overlap_bursts and eng.config.decode_steps > 1, eng._pending is not None)
        return [eng.add_request(prompt(tiny, "a late one"), greedy(20))]

    jobs = [(prompt(tiny, "first"), greedy(40)), (prompt(tiny, "second one"), greedy(33))]
    three_ways(tiny, jobs, {3: join}, same_steps=False, max_batch=3)
    assert seen == {True: True, False: False}
    eng = engine(tiny, max_batch=3)
    for p, params in jobs:
        eng.add_request(p, params)
    for _ in range(3):
        eng.step()
    late = eng.add_request(prompt(tiny, "a late one"), greedy(20))
    outs = eng.step()  # the pending burst: the running rows' tokens only
    assert eng._pending is None and [len(o.new_token_ids) for o in outs] == [S, S]
    assert [o.request_id for o in eng.step()][-1] == late  # admitted at the next step


def test_a_slot_with_dropped_keys_is_reused(tiny):
    """A row stops while its next burst is in flight (whose keys land past its end in its slot, dropped); a
    request added later takes that slot (with single steps it waits for it), and bursts overlap again."""
    ids = prompt(tiny, "stop me")
    [(_, tokens, _, _)] = run(engine(tiny, 1), [(ids, greedy(40))])

    def more(eng, log):
        return [eng.add_request(prompt(tiny, "three three"), greedy(30))]

    jobs = [(ids, greedy(40, stop_token_ids=(tokens[12],))), (prompt(tiny, "two"), greedy(60))]
    _, eng = three_ways(tiny, jobs, {5: more}, same_steps=False, max_batch=2)
    assert eng.fed.count(True) >= 3


def test_an_abort_while_a_burst_is_pending(tiny):
    """Aborting a row of the pending burst: the other gets its tokens as without overlap, the aborted one
    nothing more; aborting every row drops the pending burst."""
    pending = []

    def abort_first(eng, log):
        pending.append(eng._pending is not None)
        eng.abort(next(iter(log.got)))

    jobs = [(prompt(tiny, "abort me"), greedy(40)), (prompt(tiny, "keep me"), greedy(40))]
    serial, piped = (run(engine(tiny, overlap=o, max_batch=2), jobs, {2: abort_first}) for o in (False, True))
    assert pending == [False, True] and piped == serial
    assert piped[0][2] is None and piped[0][3] == [1, 8]  # its first burst, then nothing
    alone = run(engine(tiny, 1, max_batch=2), jobs)
    assert piped[1][:3] == alone[1][:3] and piped[0][1] == alone[0][1][:9]
    eng = engine(tiny, max_batch=2)
    rids = [eng.add_request(p, params) for p, params in jobs]
    eng.step(), eng.step()
    assert eng._pending is not None
    for rid in rids:
        eng.abort(rid)
    assert eng._pending is None and eng.num_unfinished == 0 and eng.step() == []


@pytest.mark.parametrize("room", [2 * S - 1, 2 * S, 2 * S + 1, 3 * S + 2])
def test_near_the_context_end(tiny, room):
    """The context ends `room` tokens after the prompt: a burst is launched ahead only while its key writes fit
    the cache (writing past it raises on the CPU)."""
    ids = prompt(tiny, "near the end")
    single, eng = three_ways(tiny, [(ids, greedy(100))], max_seq_len=len(ids) + room)
    assert single[0][2] == FinishReason.LENGTH and len(single[0][1]) == room
    assert any(eng.fed) == (room >= 2 * S)  # the first burst's successor writes up to position len + 2S - 1
