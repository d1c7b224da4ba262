"""The benchmark harness on a tiny random shape (CPU): random models of every variant that runs here, the
Engine-driven measurements, the table. The GPU numbers themselves come from benchmarks/gpu_decode.py."""

import torch

from lowbit.eval import bench
from lowbit.eval.random_model import (
    SHAPES,
    VARIANTS,
    Variant,
    decode_bytes,
    random_model,
)
from lowbit.model.linear import QuantLinear

TINY = SHAPES["llama-7b"].__class__(vocab_size=64, hidden_size=128, intermediate_size=160, num_layers=2,
                                    num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=64)


def test_random_gptq_model_reads_fewer_bytes_than_float():
    cpu = torch.device("cpu")
    f32 = random_model(TINY, Variant("f32", torch.float32), cpu)
    q4 = random_model(TINY, Variant("q4", torch.float32, VARIANTS["gptq-4bit-g128-act"].quant), cpu)
    assert all(m.backend == "reference" for m in q4.modules() if isinstance(m, QuantLinear))
    linear_params = sum(m.in_features * m.out_features for m in q4.modules() if isinstance(m, QuantLinear))
    head = TINY.vocab_size * TINY.hidden_size * 4
    assert decode_bytes(f32) == linear_params * 4 + head
    assert linear_params * 0.5 + head < decode_bytes(q4) < linear_params * 0.75 + head
    tokens = torch.randint(0, TINY.vocab_size, (2, 5))
    with torch.no_grad():
        assert torch.isfinite(q4(tokens)).all() and torch.isfinite(f32(tokens)).all()


def test_bench_model_and_table():
    model = random_model(TINY, Variant("f32", torch.float32), torch.device("cpu"))
    config = bench.BenchConfig(batches=(1, 2), prompt_len=4, new_tokens=3, prefill_len=8, prefill_chunk=3,
                               embeddings_on_host=True)  # chunks 3, 3, 2; host embeddings: a no-op on the CPU
    row = bench.bench_model("f32", model, bench._NullTokenizer(), config)
    assert set(row.decode) == {1, 2} and all(v > 0 for v in row.decode.values())
    assert row.prefill_tps > 0 and row.ttft_ms > 0 and row.graph_tps is None
    assert row.peak_gb is None and row.peak_all_gb is None  # no memory figures off CUDA
    text = bench.table([row, bench.BenchRow("broken", note="does not fit")], config, copy_gbps=100.0)
    lines = text.splitlines()
    assert len(lines) == 4 and lines[0].count("|") == lines[2].count("|") == lines[3].count("|")
    assert "decode tok/s b=2" in lines[0] and "does not fit" in lines[3]
    assert "peak GB (b=1: load, prefill, decode)" in lines[0]


def test_decode_rate_counts_the_tokens_of_bursts():
    """An engine step can make a burst of decode_steps tokens per row: the rate counts tokens, not steps."""
    from lowbit.engine.engine import Engine, EngineConfig

    model = random_model(TINY, Variant("f32", torch.float32), torch.device("cpu"))
    engine = Engine(model, bench._NullTokenizer(), EngineConfig(max_batch=2, max_seq_len=40, decode_steps=4,
                                                                eager_bursts=True))
    _, seconds, tokens = bench._timed_run(engine, bench._prompts(TINY.vocab_size, 2, 5, 0), 11)
    assert tokens == 2 * 10 and seconds > 0
