"""The fast GPU path end to end (marked gpu): Triton GPTQ linears, fused small ops, one-launch decode
attention and CUDA-graph decode steps, against the torch reference path (the same checkpoint on the CPU in
float32) for whole models, and graphs against eager decoding."""

from __future__ import annotations

import pytest
import torch

from lowbit.engine.cuda_graphs import DecodeGraphs, GraphPool, PrefillGraphs
from lowbit.engine.prefill import prefill
from lowbit.engine.engine import Engine, EngineConfig
from lowbit.engine.kv_cache import KVCache
from lowbit.engine.sampling import SamplingParams
from lowbit.eval.bench import _NullTokenizer
from lowbit.model.weights import load_model
from tests.conftest import tiny_config
from tests.model.test_gptq_loading import write_gptq_checkpoint

pytestmark = pytest.mark.gpu

CFG = dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
           num_hidden_layers=3, vocab_size=320, max_position_embeddings=512)


def close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-2) -> None:
    """fp16 against float32: relative to the logits' scale."""
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float().cpu(), want.float(), rtol=tol, atol=tol * float(want.abs().max()))


@pytest.fixture(scope="module", params=[(4, 128, True, False, "gptq"), (3, 64, False, True, "gptq_v2"),
                                        (8, 32, True, False, "gptq_v2")], ids=["4bit-act", "3bit", "8bit-act"])
def models(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gptq")
    write_gptq_checkpoint(folder, tiny_config(**CFG), *request.param)
    fast, _ = load_model(folder, device="cuda", dtype=torch.float16)
    ref, _ = load_model(folder, device="cpu", dtype=torch.float32, backend="reference")
    assert fast.layers[0].mlp.w2.backend == "triton"
    return fast, ref


@pytest.fixture
def reproducible():
    """Deterministic algorithms for the tests that compare greedy tokens of two decode paths one for one. One-row
    decode otherwise adds its linears' sums with atomics (`Block.forward_into`), whose order, and so the last
    bits, vary between runs: these random models' near-ties (two tokens taking turns) then break either way.
    Deterministic mode keeps the bit-reproducible path; the atomics path is compared with a tolerance in
    `test_prefill_and_decode_logits_match_the_reference` (B=1) and test_linear_backends."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("B", [1, 2])
def test_prefill_and_decode_logits_match_the_reference(models, B):
    """Teacher-forced: both paths see the same tokens; every step's logits compared (B=1: one-row decode, its
    linears adding into a float32 residual stream)."""
    fast, ref = models
    T, steps = 37, 12
    tokens = torch.randint(1, CFG["vocab_size"], (B, T + steps))
    caches = [KVCache(m.config, B, 128, dt, dev) for m, dt, dev in ((fast, torch.float16, "cuda"),
                                                                   (ref, torch.float32, "cpu"))]
    graphs = DecodeGraphs(fast, caches[0], max_batch=B)
    with torch.inference_mode():
        close(fast(tokens[:, :T].cuda()), ref(tokens[:, :T]))  # no cache: causal over the prompt
        rows = torch.arange(B)
        close(fast(tokens[:, :T].cuda(), None, caches[0], rows.cuda(), last_only=True),
              ref(tokens[:, :T], None, caches[1], rows, last_only=True))
        for i in range(T, T + steps):
            got, _ = graphs.run(tokens[:, i].tolist(), [i] * B, rows.tolist())
            want = ref(tokens[:, i:i + 1], torch.full((B, 1), i), caches[1], rows)[:, -1]
            close(got, want)


def test_graphs_decode_like_eager_steps(models, reproducible):
    """Same engine, graphs on and off: the same greedy tokens for a batch of prompts of different lengths."""
    fast, _ = models
    prompts = [torch.randint(1, CFG["vocab_size"], (n,)).tolist() for n in (5, 40, 17)]
    params = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)
    outs = []
    for graphs in (True, False):
        engine = Engine(fast, _NullTokenizer(), EngineConfig(max_batch=3, max_seq_len=128, cuda_graphs=graphs))
        assert (engine.graphs is not None) == graphs
        outs.append([ids for _, ids, _ in engine.generate(prompts, params)])
    assert outs[0] == outs[1]
    assert not engine.cache.locks.any()


def burst_run(model, prompts, params, steps: int, graphs: bool = True, max_seq_len: int = 128, overlap: bool = True):
    """Greedy token ids per prompt from an engine with `steps` decode steps per burst (eager bursts where
    graphs are off), and the engine."""
    config = EngineConfig(max_batch=len(prompts), max_seq_len=max_seq_len, cuda_graphs=graphs, decode_steps=steps,
                          eager_bursts=True, overlap_bursts=overlap)
    engine = Engine(model, _NullTokenizer(), config)
    rids = [engine.add_request(p, q) for p, q in zip(prompts, params)]
    ids = {rid: [] for rid in rids}
    while engine.num_unfinished:
        for out in engine.step():
            ids[out.request_id] += out.new_token_ids
    return [ids[rid] for rid in rids], engine


def test_graph_bursts_decode_like_single_steps(models, reproducible):
    """8-step graphs against single-step graphs and against the eager burst loop: the same greedy tokens for
    3 rows (a padded bucket of 4) of different lengths and budgets (rows finish mid-burst), then with a
    stop id hit mid-burst, then one row running into the end of the context."""
    fast, _ = models
    prompts = [torch.randint(1, CFG["vocab_size"], (n,)).tolist() for n in (5, 40, 17)]
    params = [SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True) for n in (21, 12, 30)]
    single, _ = burst_run(fast, prompts, params, 1)
    burst, engine = burst_run(fast, prompts, params, 8)
    assert burst == single and (4, 8) in engine.graphs.graphs
    assert burst_run(fast, prompts, params, 8, graphs=False)[0] == single
    assert not engine.cache.locks.any()
    stop = single[0][5]
    params[0] = SamplingParams(temperature=0, max_new_tokens=21, ignore_eos=True, stop_token_ids=(stop,))
    want = burst_run(fast, prompts, params, 1)[0]
    assert want[0] == single[0][:single[0].index(stop)]
    assert burst_run(fast, prompts, params, 8)[0] == want
    long = [SamplingParams(temperature=0, max_new_tokens=100, ignore_eos=True)]
    want = burst_run(fast, prompts[1:2], long, 1, max_seq_len=len(prompts[1]) + 19)[0]
    assert len(want[0]) == 19 and burst_run(fast, prompts[1:2], long, 8, max_seq_len=len(prompts[1]) + 19)[0] == want


def test_overlapped_graph_bursts_decode_like_single_steps(models, monkeypatch, reproducible):
    """Bursts launched while the host applies the previous one (their tokens fed from its last argmax on the
    device, 3 rows in a padded bucket of 4) against bursts one at a time and single steps: the same greedy
    tokens, also with a stop id hit in a burst whose successor is already in flight."""
    fast, _ = models
    fed = []
    run = DecodeGraphs.run

    def spy(self, tokens, *args):
        fed.append(isinstance(tokens, torch.Tensor))
        return run(self, tokens, *args)

    monkeypatch.setattr(DecodeGraphs, "run", spy)
    prompts = [torch.randint(1, CFG["vocab_size"], (n,)).tolist() for n in (5, 40, 17)]
    params = [SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True) for n in (45, 37, 60)]
    single, _ = burst_run(fast, prompts, params, 1)
    assert burst_run(fast, prompts, params, 8, overlap=False)[0] == single and not any(fed)
    piped, engine = burst_run(fast, prompts, params, 8)
    assert piped == single and fed.count(True) >= 3 and engine._pending is None
    stop = single[1][12]
    params[1] = SamplingParams(temperature=0, max_new_tokens=37, ignore_eos=True, stop_token_ids=(stop,))
    want = burst_run(fast, prompts, params, 1)[0]
    assert want[1] == single[1][:single[1].index(stop)] and burst_run(fast, prompts, params, 8)[0] == want
    assert not engine.cache.locks.any()


def test_prefill_graphs_prefill_like_eager(models):
    """Short prompts replayed from prefill graphs (the capture, then a replay with another prompt of the same
    padded length, then another length) against the eager prefill: the last logits, and the prompt's keys and
    values in its slot."""
    fast, _ = models
    caches = [KVCache(fast.config, 3, 128, torch.float16, "cuda") for _ in range(2)]
    graphs = PrefillGraphs(fast, caches[0], 64, GraphPool())
    with torch.inference_mode():
        for n, slot in ((20, 1), (29, 2), (7, 0), (64, 1)):
            prompt = torch.randint(1, CFG["vocab_size"], (n,)).tolist()
            got = graphs.run(prompt, slot)
            want = prefill(fast, caches[1], prompt, slot, None, torch.device("cuda"))
            close(got, want.float().cpu())
            for a, b in ((caches[0].k, caches[1].k), (caches[0].v, caches[1].v)):
                close(a[:, slot, :, :n], b[:, slot, :, :n].float().cpu())
        assert sorted(graphs.graphs) == [16, 32, 64]
        assert graphs.run(list(range(1, 66)), 0) is None  # longer than 64: not a graph's prompt


def test_engine_with_prefill_graphs_decodes_the_same_tokens(models, reproducible):
    """The engine with prefill graphs up to 64 tokens against without: the same greedy tokens. The short prompts'
    lengths are their padded lengths, so both ways run the same kernels (the random models' near-ties could
    otherwise break either way); the 90-token prompt takes the eager prefill in both."""
    fast, _ = models
    prompts = [torch.randint(1, CFG["vocab_size"], (n,)).tolist() for n in (16, 64, 32, 90)]
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    outs = []
    for short in (0, 64):
        engine = Engine(fast, _NullTokenizer(), EngineConfig(max_batch=2, max_seq_len=128, prefill_graphs=short))
        assert (engine.padded is None) == (short == 0)
        outs.append([ids for _, ids, _ in engine.generate(prompts, params)])
    assert outs[0] == outs[1]
