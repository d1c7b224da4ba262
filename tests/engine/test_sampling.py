"""Sampling pipeline against HF transformers' own processors, plus the draw, penalties and params."""

import math
import random

import pytest
import torch

from lowbit.engine.sampling import (
    PenaltyHistory,
    SamplingParams,
    make_generator,
    process_logits,
    sample,
)
from lowbit.errors import LowbitError

V = 97


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(cfg)


def hf_processors(model, p: SamplingParams, seq_len: int):
    """The processor list `generate` itself builds for these params (no top_k=50 default: we pass ours)."""
    from transformers import GenerationConfig

    if p.greedy:
        config = GenerationConfig(do_sample=False, repetition_penalty=p.repetition_penalty)
    else:
        config = GenerationConfig(
            do_sample=True,
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            min_p=p.min_p,
            typical_p=p.typical_p,
            repetition_penalty=p.repetition_penalty,
        )
    return model._get_logits_processor(
        generation_config=config, input_ids_seq_length=seq_len, encoder_input_ids=None, device="cpu", model_kwargs={}
    )


def random_params(rng: random.Random) -> SamplingParams:
    pick = lambda off, *values: off if rng.random() < 0.4 else rng.choice(values)
    return SamplingParams(
        temperature=pick(1.0, 0.0, 0.3, 0.7, 1.3),
        top_k=pick(0, 1, 5, 40, V + 10),
        top_p=pick(1.0, 0.1, 0.5, 0.9, 0.95),
        min_p=pick(0.0, 0.02, 0.1, 0.5),
        typical_p=pick(1.0, 0.2, 0.8, 0.95),
        repetition_penalty=pick(1.0, 0.8, 1.1, 1.5),
    )


def history_for(ids: torch.Tensor, prompt_len: int) -> PenaltyHistory:
    """ids [B, L]: prompt (first prompt_len) then generated tokens."""
    h = PenaltyHistory.empty(ids.shape[0], V)
    for row in range(ids.shape[0]):
        h.start(row, ids[row, :prompt_len])
    for step in range(prompt_len, ids.shape[1]):
        h.append(ids[:, step])
    return h


def test_hf_builds_pipeline_in_our_order(hf_model):
    p = SamplingParams(temperature=0.7, top_k=40, top_p=0.95, min_p=0.05, typical_p=0.9, repetition_penalty=1.1)
    names = [type(x).__name__ for x in hf_processors(hf_model, p, 4)]
    assert names == [
        "RepetitionPenaltyLogitsProcessor",
        "TemperatureLogitsWarper",
        "TopKLogitsWarper",
        "TopPLogitsWarper",
        "MinPLogitsWarper",
        "TypicalLogitsWarper",
    ]


@pytest.mark.parametrize("seed", range(6))
def test_mixed_batch_matches_hf(hf_model, seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    B, prompt_len, L = 16, 6, 10
    params = [random_params(rng) for _ in range(B)]
    logits = torch.randn(B, V, generator=gen) * rng.choice([1.0, 3.0, 8.0])
    ids = torch.randint(0, V, (B, L), generator=gen)
    ours = process_logits(logits, params, history_for(ids, prompt_len))
    for row, p in enumerate(params):
        expected = hf_processors(hf_model, p, prompt_len)(ids[row : row + 1], logits[row : row + 1].clone())
        torch.testing.assert_close(ours[row : row + 1], expected, msg=f"row {row} {p}")


def test_typical_and_top_p_edges_match_hf(hf_model):
    """Peaked and flat rows, where min_tokens_to_keep and the threshold-crossing token matter."""
    logits = torch.stack(
        [
            torch.full((V,), 0.5),
            torch.arange(V, dtype=torch.float32) * 2.0,
            torch.tensor([20.0] + [0.0] * (V - 1)),
            torch.linspace(-5, 5, V),
        ]
    )
    ids = torch.zeros(4, 1, dtype=torch.long)
    for p in [
        SamplingParams(top_p=0.01),
        SamplingParams(top_p=1e-9),
        SamplingParams(typical_p=0.01),
        SamplingParams(min_p=1.0),
        SamplingParams(top_k=1),
        SamplingParams(typical_p=0.5, top_p=0.5, temperature=0.5),
    ]:
        ours = process_logits(logits, [p] * 4, PenaltyHistory.empty(4, V))
        expected = hf_processors(hf_model, p, 1)(ids, logits.clone())
        torch.testing.assert_close(ours, expected)
        assert (ours.isfinite().sum(-1) >= 1).all()


def test_top_p_keeps_the_token_that_crosses_the_threshold(hf_model):
    """Four equal tokens: cumulative 0.25, 0.5, ... exactly; top_p=0.5 keeps exactly two (as HF)."""
    logits, p = torch.zeros(1, 4), SamplingParams(top_p=0.5)
    ours = process_logits(logits, [p])
    torch.testing.assert_close(ours, hf_processors(hf_model, p, 1)(torch.zeros(1, 1, dtype=torch.long), logits))
    assert ours.isfinite().sum() == 2
    assert process_logits(logits, [SamplingParams(top_p=0.6)]).isfinite().sum() == 3


def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 0.0]])
    h = PenaltyHistory.empty(1, 5)
    h.start(0, [0, 1, 4])
    out = process_logits(logits, [SamplingParams(temperature=0, repetition_penalty=2.0)], h)
    torch.testing.assert_close(out, torch.tensor([[1.0, -4.0, 2.0, -2.0, 0.0]]))


def test_presence_frequency_follow_openai():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, V, generator=gen)
    h = PenaltyHistory.empty(2, V)
    h.start(0, [1, 2, 3])  # the prompt does not count for presence / frequency
    h.start(1, [])
    generated = torch.randint(0, V, (12, 2), generator=gen)
    for tokens in generated:
        h.append(tokens)
    counts = torch.zeros(2, V)
    for row in range(2):
        counts[row].index_add_(0, generated[:, row], torch.ones(12))
    params = [
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.3),
        SamplingParams(presence_penalty=-1.0, frequency_penalty=1.5),
    ]
    expected = logits - torch.tensor([[0.3], [1.5]]) * counts - torch.tensor([[0.5], [-1.0]]) * (counts > 0)
    torch.testing.assert_close(process_logits(logits, params, h), expected)
    assert torch.equal(h.counts.float(), counts)


def test_history_append_subset_and_select():
    h = PenaltyHistory.empty(3, 8)
    h.append(torch.tensor([5, 5]), rows=torch.tensor([0, 2]))
    h.append(torch.tensor([5]), rows=torch.tensor([2]))
    assert h.counts[:, 5].tolist() == [1, 0, 2]
    assert h.select(torch.tensor([2])).counts[0, 5] == 2


def test_greedy_is_argmax_of_penalized_logits():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, V, generator=gen)
    h = PenaltyHistory.empty(5, V)
    top = logits.argmax(-1)
    for row in range(5):
        h.start(row, [int(top[row])])
    params = [SamplingParams(temperature=0, top_k=3, top_p=0.1)] * 4 + [
        SamplingParams(temperature=0, repetition_penalty=1e3)
    ]
    tokens = sample(logits, params, h)
    assert tokens.dtype == torch.int64
    assert tokens[:4].tolist() == top[:4].tolist()
    assert tokens[4] != top[4]


def test_mixed_greedy_and_sampled_rows():
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(2))
    params = [
        SamplingParams(temperature=0),
        SamplingParams(top_k=1),
        SamplingParams(temperature=0),
        SamplingParams(temperature=2.0),
    ]
    tokens = sample(logits, params)
    assert tokens[:3].tolist() == logits[:3].argmax(-1).tolist()


def seeded_run(other_rows: int, other_params: SamplingParams, steps: int = 20) -> list[int]:
    """Sample row 0 (seed 1234) `steps` times next to `other_rows` unseeded rows."""
    p = SamplingParams(temperature=0.9, top_p=0.9, seed=1234)
    generators = [make_generator(p.seed)] + [None] * other_rows
    logits = torch.randn(steps, 1 + other_rows, V, generator=torch.Generator().manual_seed(3))
    logits[:, 0] = torch.randn(steps, V, generator=torch.Generator().manual_seed(4))
    out = []
    for step in range(steps):
        out.append(int(sample(logits[step], [p] + [other_params] * other_rows, None, generators)[0]))
    return out


def test_seeded_rows_reproducible_and_independent_of_batch():
    alone = seeded_run(0, SamplingParams())
    assert alone == seeded_run(0, SamplingParams())
    assert alone == seeded_run(5, SamplingParams(temperature=0.5, top_k=3))
    assert alone == seeded_run(2, SamplingParams(temperature=0))
    assert len(set(alone)) > 1


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """Over the tokens with probability > 0; asserts that no removed token was drawn."""
    observed = torch.bincount(tokens, minlength=probs.numel()).float()
    kept = probs > 0
    assert observed[~kept].sum() == 0
    expected = probs[kept] * tokens.numel()
    return ((observed[kept] - expected) ** 2 / expected).sum().item()


def test_draw_follows_distribution():
    """Chi-square on a small vocab after top_k removes the tail: a batch of unseeded rows, one seeded stream."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, -6.0])
    p = SamplingParams(temperature=0.8, top_k=6)
    probs = process_logits(logits[None], [p]).softmax(-1)[0]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        batch = sample(logits.expand(40_000, -1), [p] * 40_000)
    assert chi_square(batch, probs) < 20.5  # df = 5, p = 0.001
    seeded, generator = SamplingParams(temperature=0.8, top_k=6, seed=7), make_generator(7)
    stream = torch.cat([sample(logits[None], [seeded], None, [generator]) for _ in range(2_000)])
    assert chi_square(stream, probs) < 20.5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
        ({"temperature": -0.1}, "temperature must be >= 0, got -0.1"),
        ({"top_k": -1}, "top_k must be an int >= 0"),
        ({"min_p": 1.1}, "min_p must be in [0, 1], got 1.1"),
        ({"typical_p": 0.0}, "typical_p must be in (0, 1]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
        ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2]"),
        ({"frequency_penalty": math.nan}, "frequency_penalty must be in [-2, 2]"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"seed": -1}, "seed must be in [0, 2**64)"),
        ({"stop": "\n"}, "stop must be a sequence"),
        ({"stop": ("",)}, "stop must hold non-empty strings"),
    ],
)
def test_validation(kwargs, message):
    with pytest.raises(LowbitError) as info:
        SamplingParams(**kwargs)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value).replace("'\\n'", "")


def test_params_frozen_and_lists_become_tuples():
    p = SamplingParams(stop=["###"], stop_token_ids=[2, 3])
    assert p.stop == ("###",) and p.stop_token_ids == (2, 3)
    assert hash(p)
    with pytest.raises(AttributeError):
        p.top_k = 3  # type: ignore[misc]
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sample_does_not_sync_on_cuda():
    logits = torch.randn(4, 32000, device="cuda")
    h = PenaltyHistory.empty(4, 32000, device="cuda")
    params = [
        SamplingParams(
            temperature=0.7,
            top_k=40,
            top_p=0.95,
            min_p=0.05,
            typical_p=0.9,
            repetition_penalty=1.1,
            presence_penalty=0.2,
            seed=1,
        ),
        SamplingParams(temperature=0),
        SamplingParams(),
        SamplingParams(frequency_penalty=0.5),
    ]
    generators = [make_generator(1, "cuda"), None, None, None]
    sample(logits, params, h, generators)  # warm up allocators
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = sample(logits, params, h, generators)
        h.append(tokens)
        h.start(1, [5, 6, 7])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tokens.shape == (4,)
