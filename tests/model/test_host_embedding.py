"""Token embeddings in pinned host memory: a no-op off the GPU, ignored (with a warning) for tied embeddings,
and on a GPU the same logits and greedy tokens as before, eagerly and through CUDA-graph decode steps, with
the table's GPU memory freed."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from lowbit.config import ModelConfig
from lowbit.engine.engine import Engine, EngineConfig
from lowbit.engine.sampling import SamplingParams
from lowbit.eval.bench import _NullTokenizer
from lowbit.model.host_embedding import HostEmbedding, embeddings_to_host
from lowbit.model.llama import Transformer

CONFIG = ModelConfig(vocab_size=320, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=8,
                     num_kv_heads=2, head_dim=32, max_position_embeddings=256)


def tiny(device: str = "cpu", dtype: torch.dtype = torch.float32, **overrides) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(**{**CONFIG.__dict__, **overrides})
    return Transformer(config).to(device, dtype).eval()


def test_cpu_model_is_left_alone(caplog):
    model = tiny()
    with caplog.at_level(logging.INFO, logger="lowbit.model.host_embedding"):
        assert not embeddings_to_host(model)
    assert isinstance(model.tok_embeddings, torch.nn.Embedding) and "nothing to do" in caplog.text
    engine = Engine(model, _NullTokenizer(), EngineConfig(max_seq_len=32, embeddings_on_host=True))
    [(_, ids, _)] = engine.generate([[1, 2, 3]], SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True))
    assert len(ids) == 3


def test_tied_embeddings_are_ignored_with_a_warning(caplog):
    model = tiny(tie_word_embeddings=True)
    with caplog.at_level(logging.WARNING, logger="lowbit.model.host_embedding"):
        assert not embeddings_to_host(model)
    assert "ties its token embeddings to lm_head" in caplog.text
    assert model.output.weight is model.tok_embeddings.weight


def test_host_embedding_module_keeps_the_state_dict_name_and_no_parameter():
    model = tiny()
    weight = model.tok_embeddings.weight.detach().clone()
    model.tok_embeddings = HostEmbedding(weight)
    assert "tok_embeddings.weight" in model.state_dict()
    assert all(p is not weight for p in model.parameters())
    tokens = torch.tensor([[5, 0, 319]])
    assert torch.equal(model.tok_embeddings(tokens), weight[tokens])


@pytest.mark.gpu
def test_gpu_logits_and_greedy_tokens_unchanged_and_memory_freed():
    model = tiny("cuda", torch.float16, vocab_size=4096)  # a 2 MB table: its release is plain to see
    reference = copy.deepcopy(model)
    tokens = torch.randint(0, 4096, (2, 9), device="cuda")
    params = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    prompts = [torch.randint(0, 4096, (n,)).tolist() for n in (7, 30)]
    with torch.inference_mode():
        want = model(tokens)
    want_ids = [ids for _, ids, _ in Engine(reference, _NullTokenizer(),
                                            EngineConfig(max_batch=2, max_seq_len=64)).generate(prompts, params)]
    table_bytes = 4096 * CONFIG.hidden_size * 2
    before = torch.cuda.memory_allocated()
    engine = Engine(model, _NullTokenizer(), EngineConfig(max_batch=2, max_seq_len=64, embeddings_on_host=True))
    grown = torch.cuda.memory_allocated() - before  # the engine's cache and buffers, less the table
    assert grown <= engine.cache.nbytes + (256 << 10) - table_bytes
    table = model.tok_embeddings.weight
    assert isinstance(model.tok_embeddings, HostEmbedding) and table.device.type == "cpu" and table.is_pinned()
    with torch.inference_mode():
        assert torch.equal(model(tokens), want)
    assert engine.graphs is not None
    assert [ids for _, ids, _ in engine.generate(prompts, params)] == want_ids  # decode steps in CUDA graphs
