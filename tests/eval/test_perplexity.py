"""Perplexity against transformers' own loss on a tiny random model; window counting; SmolLM2 on prose."""

import math

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.eval import perplexity as ppl_module
from lowbit.eval.perplexity import perplexity, window_nll
from lowbit.model.weights import load_model


@pytest.fixture
def tiny(hf_checkpoint):
    folder, hf = hf_checkpoint()  # vocab 96, max_position_embeddings 64
    model, _ = load_model(folder)
    return model, hf


def test_matches_transformers_loss(tiny):
    model, hf = tiny
    tokens = torch.randint(0, 96, (1, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        losses = [hf(input_ids=w[None], labels=w[None]).loss.item() for w in tokens[0, :192].view(6, 32)]
    expected = math.exp(sum(losses) / len(losses))
    got = perplexity(model, tokens, seqlen=32)
    assert got.ppl == pytest.approx(expected, rel=1e-4)
    assert got.nll == pytest.approx(math.log(got.ppl))


def test_counts_batches_and_caps(tiny):
    model, _ = tiny
    tokens = torch.randint(0, 96, (1, 200), generator=torch.Generator().manual_seed(2))
    one = perplexity(model, tokens, seqlen=32)
    assert (one.windows, one.tokens) == (6, 6 * 31)  # the 8-token tail is dropped
    batched = perplexity(model, tokens, seqlen=32, batch_size=4)  # batches of 4 and 2
    assert batched.ppl == pytest.approx(one.ppl, rel=1e-5)
    capped = perplexity(model, tokens, seqlen=2048)  # capped at max_position_embeddings = 64
    assert (capped.windows, capped.tokens) == (3, 3 * 63)
    assert perplexity(model, tokens, seqlen=32, max_windows=2).windows == 2
    with pytest.raises(LowbitError, match="60 tokens make no window of seqlen 64"):
        perplexity(model, tokens[:, :60], seqlen=64)


def test_chunked_loss_equals_whole(monkeypatch):
    logits, tokens = torch.randn(37, 11, dtype=torch.float16), torch.randint(0, 11, (37,))
    whole = torch.nn.functional.cross_entropy(logits[:-1].float(), tokens[1:], reduction="sum").item()
    monkeypatch.setattr(ppl_module, "LOSS_CHUNK", 5)
    assert window_nll(logits, tokens) == pytest.approx(whole, rel=1e-6)


@pytest.mark.slow
def test_smollm2_prose_beats_shuffled(smollm2_dir):
    from lowbit.data import eval_tokens, python_docs_split
    from lowbit.model.tokenizer import Tokenizer

    model, _ = load_model(smollm2_dir)
    _, evaluation = python_docs_split()
    tokens = eval_tokens(Tokenizer.from_pretrained(smollm2_dir), evaluation[:2])[:, : 2 * 256]
    shuffled = tokens[:, torch.randperm(tokens.shape[1], generator=torch.Generator().manual_seed(0))]
    prose = perplexity(model, tokens, seqlen=256, batch_size=2)
    noise = perplexity(model, shuffled, seqlen=256, batch_size=2)
    assert prose.windows == 2 and math.isfinite(prose.ppl)
    assert prose.ppl < 40 and noise.ppl > 10 * prose.ppl
