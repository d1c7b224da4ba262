"""QuantLinear backends chosen from their declarations, and the "triton" backend (Triton's interpreter on
CPU, the real kernels on CUDA) against the torch reference on whole GPTQ checkpoints: fused q/k/v and
gate/up, act-order with one permutation or distinct ones (ConcatLinear), 3- and 4-bit, v1 and v2."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
pytest.importorskip("triton")

from lowbit.config import QuantConfig
from lowbit.engine.kv_cache import KVCache
from lowbit.model.linear import ConcatLinear, QuantLinear, pick_backend
from lowbit.model.weights import load_model
from tests.conftest import tiny_config
from tests.model.test_gptq_loading import write_gptq_checkpoint

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_pick_backend_from_declarations():
    q4 = QuantConfig(bits=4, group_size=128, desc_act=True, sym=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert pick_backend(q4, cuda, torch.float16, dense_fits=True) == "triton"
    assert pick_backend(q4, cuda, torch.bfloat16, dense_fits=False) == "triton"
    assert pick_backend(q4, cpu, torch.float32, dense_fits=True) == "dense"
    assert pick_backend(q4, cpu, torch.float32, dense_fits=False) == "reference"


@pytest.mark.parametrize("bits,group_size,desc_act,sym,fmt,distinct", [
    (4, 32, True, False, "gptq", False),
    (3, 32, False, True, "gptq_v2", False),
    (4, 32, True, True, "gptq_v2", True),
])
def test_triton_backend_matches_reference(tmp_path, bits, group_size, desc_act, sym, fmt, distinct):
    cfg = tiny_config(hidden_size=96, intermediate_size=160, num_attention_heads=6, num_key_value_heads=2)
    write_gptq_checkpoint(tmp_path, cfg, bits, group_size, desc_act, sym, fmt, distinct_perms=distinct)
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    fast, _ = load_model(tmp_path, device=DEVICE, dtype=dtype, backend="triton")
    ref, _ = load_model(tmp_path, device="cpu", dtype=torch.float32, backend="reference")
    linears = [m for m in fast.modules() if isinstance(m, QuantLinear)]
    assert all(m.backend == "triton" and m.kernel_weight is not None for m in linears)
    assert all(m.qweight.device.type == "cpu" for m in linears), "checkpoint tensors wait on the host"
    assert isinstance(fast.layers[0].attention.wqkv, ConcatLinear) == distinct
    sorted_inputs = [m for m in linears if m.input_order(1) is not None]
    assert all(m.input_order(1 << 20) is None for m in linears) or DEVICE == "cpu", "large M: dequantize path"
    assert bool(sorted_inputs) == desc_act, "act-order layers read x pre-sorted by the norm/SwiGLU before them"
    tokens = torch.randint(0, cfg["vocab_size"], (2, 7))
    with torch.no_grad():
        got, want = fast(tokens.to(DEVICE)).float().cpu(), ref(tokens)
    tol = 2e-2 if dtype == torch.float16 else 1e-4
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))
    caches = KVCache(fast.config, 2, 16, dtype, DEVICE), KVCache(ref.config, 2, 16, torch.float32, "cpu")
    rows, pos = torch.arange(2), torch.full((2, 1), 6)  # a prefill, then a step through the cache
    with torch.no_grad():
        fast(tokens[:, :6].to(DEVICE), None, caches[0], rows.to(DEVICE))
        ref(tokens[:, :6], None, caches[1], rows)
        got = fast(tokens[:, 6:].to(DEVICE), pos.to(DEVICE), caches[0], rows.to(DEVICE)).float().cpu()
        want = ref(tokens[:, 6:], pos, caches[1], rows)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))
    linears[0].use_backend("reference", dtype)  # and back: the checkpoint tensors return to the device
    assert linears[0].kernel_weight is None and linears[0].qweight.device.type == DEVICE


@pytest.mark.parametrize("desc_act,mma", [(False, False), (True, False), (False, True), (True, True)])
def test_one_row_decode_adds_into_a_float32_residual_stream(tmp_path, monkeypatch, desc_act, mma):
    """One-row decode on the "triton" GEMV (LOWBIT_MMA=0) or the mma layout's kernel (CUDA) keeps the residual
    stream in float32 and lets every linear add into float32 (`Block.forward_into`); so do a few rows on the mma
    kernel (the 6-row prefill here). More rows on the GEMV's layout, or deterministic algorithms, keep the
    float16 residual. The logits match the reference either way."""
    from lowbit.model import llama

    monkeypatch.setenv("LOWBIT_MMA", "1" if mma else "0")
    if mma and DEVICE != "cuda":  # "auto" picks the mma layout on CUDA only; the interpreter emulates its kernels
        from lowbit.kernels import qmatmul

        repack = qmatmul.repack
        monkeypatch.setattr(qmatmul, "repack", lambda *args: repack(*args[:5], "mma"))
    cfg = tiny_config(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    write_gptq_checkpoint(tmp_path, cfg, 4, 64 if mma else 32, desc_act, False, "gptq", distinct_perms=False)
    dtype = torch.float16 if DEVICE == "cuda" or mma else torch.float32  # (the mma kernels multiply float16)
    fast, _ = load_model(tmp_path, device=DEVICE, dtype=dtype, backend="triton")
    ref, _ = load_model(tmp_path, device="cpu", dtype=torch.float32, backend="reference")
    block = fast.layers[0]
    layouts = {m.kernel_weight.layout for m in fast.modules() if isinstance(m, QuantLinear)}
    assert layouts == {"mma" if mma else "slots"}
    assert block.adds_in_place(1) and block.adds_in_place(2) == mma
    assert block.adds_in_place(64) == (mma and DEVICE != "cuda")  # on CUDA 64 rows take the tile kernel
    assert not ref.layers[0].adds_in_place(1), "the reference backend has no free add"
    streamed = []
    into = llama.Block.forward_into
    monkeypatch.setattr(llama.Block, "forward_into", lambda self, h, *a: streamed.append(h.dtype) or into(self, h, *a))
    tokens = torch.randint(0, cfg["vocab_size"], (1, 7))
    tol = 2e-2 if dtype == torch.float16 else 1e-4

    norms = []
    norm = llama.RMSNorm.forward
    monkeypatch.setattr(llama.RMSNorm, "forward", lambda self, *a, **k: norms.append(1) or norm(self, *a, **k))

    def step(model, device, model_dtype):
        cache = KVCache(model.config, 1, 16, model_dtype, device)
        rows = torch.arange(1, device=device)
        with torch.no_grad():
            model(tokens[:, :6].to(device), None, cache, rows)
            norms.clear()
            return model(tokens[:, 6:].to(device), torch.full((1, 1), 6, device=device), cache, rows).float().cpu()

    want = step(ref, "cpu", torch.float32)
    got = step(fast, DEVICE, dtype)
    steps = 2 if mma else 1  # the prefill (6 rows) adds into float32 on the mma kernel, not on the GEMV's layout
    assert streamed == [torch.float32] * (steps * cfg["num_hidden_layers"])
    assert len(norms) == 2 * cfg["num_hidden_layers"] + 1, "two a layer and the final norm before lm_head"
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))
    streamed.clear()
    with torch.no_grad():
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            assert not block.adds_in_place(1)
            got = step(fast, DEVICE, dtype)
        finally:
            torch.use_deterministic_algorithms(False)
    assert not streamed
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))


@pytest.mark.parametrize("act_order", [False, True])
def test_one_row_decode_leaves_the_attention_merge_to_wo(tmp_path, monkeypatch, act_order):
    """One-row decode with the mma layout (GQA): Attention asks the cache for unmerged split partials and wo merges them
    as its kernel loads x (`mma`'s XMG), adding into the float32 residual; the logits match the reference. (On
    the CPU the cache computes attention in torch; here a cache that runs the decode kernel anyway.) act_order:
    the partials come placed in wo's input order."""
    from lowbit.kernels import attention, qmatmul

    if DEVICE != "cuda":
        repack = qmatmul.repack
        monkeypatch.setattr(qmatmul, "repack", lambda *args: repack(*args[:5], "mma"))
    monkeypatch.setattr(attention, "CHUNK", 16)  # three live splits of four at position 39
    monkeypatch.setattr(attention, "BLOCK", 16)
    cfg = tiny_config(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    write_gptq_checkpoint(tmp_path, cfg, 4, 64, act_order, False, "gptq", distinct_perms=False)
    fast, _ = load_model(tmp_path, device=DEVICE, dtype=torch.float16, backend="triton")
    ref, _ = load_model(tmp_path, device="cpu", dtype=torch.float32, backend="reference")
    wo = fast.layers[0].attention.wo
    assert (wo.input_order(1) is not None) == act_order
    if act_order:  # opt-in until the placed merge has run on a GPU
        assert not wo.merges_attention(1)
        monkeypatch.setenv("LOWBIT_PLACED_PARTIALS", "1")
    assert wo.merges_attention(1) and not wo.merges_attention(2)
    merged = []
    add_partials = qmatmul.add_partials
    monkeypatch.setattr(qmatmul, "add_partials",
                        lambda p, *a: merged.append((p.splits, p.sources is not None)) or add_partials(p, *a))

    class KernelCache(KVCache):
        def decodes_in_kernel(self, q, fresh):
            return q.shape[1] == 1 and not fresh

    tokens = torch.randint(0, cfg["vocab_size"], (1, 40))

    def step(model, cache):
        rows = torch.arange(1, device=cache.k.device)
        with torch.no_grad():
            model(tokens[:, :39].to(cache.k.device), None, cache, rows)
            merged.clear()
            return model(tokens[:, 39:].to(cache.k.device), torch.full((1, 1), 39, device=cache.k.device), cache,
                         rows).float().cpu()

    want = step(ref, KVCache(ref.config, 1, 64, torch.float32, "cpu"))
    got = step(fast, KernelCache(fast.config, 1, 64, torch.float16, DEVICE))
    assert merged == [(4, act_order)] * cfg["num_hidden_layers"]
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))
