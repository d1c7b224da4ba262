"""GPTQ checkpoints in every variant load and reproduce the logits of their dequantized weights.

The checkpoints are written the way GPTQ tools lay them out (HF names, quantize_config.json, any file
name), from codes chosen by a naive round-to-nearest in this file. The oracle is transformers'
LlamaForCausalLM holding the dequantized float weights.
"""

import itertools
import json

import pytest
import torch
from safetensors.torch import save_file

from lowbit.errors import LowbitError
from lowbit.model.weights import load_model
from lowbit.quant import pack
from tests.conftest import tiny_config, write_hf_checkpoint

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def naive_quantize(W: torch.Tensor, bits: int, group_size: int, desc_act: bool, sym: bool, seed: int = 0):
    """Round-to-nearest per group; W [N, K] -> (codes [K, N], zeros [G, N], scales [G, N], g_idx [K])."""
    N, K = W.shape
    gs = K if group_size == -1 else group_size
    order = torch.randperm(K, generator=torch.Generator().manual_seed(seed)) if desc_act else torch.arange(K)
    g_idx = torch.empty(K, dtype=torch.int32)
    g_idx[order] = (torch.arange(K) // gs).to(torch.int32)
    G = pack.num_groups(K, group_size)
    maxq = 2**bits - 1
    scales, zeros = torch.empty(G, N), torch.empty(G, N, dtype=torch.int32)
    for g in range(G):
        cols = W[:, g_idx == g]
        lo, hi = cols.min(1).values.clamp(max=0), cols.max(1).values.clamp(min=0)
        if sym:
            amax = torch.maximum(lo.abs(), hi)
            s = (2 * amax / maxq).clamp(min=1e-5)
            z = torch.full((N,), (maxq + 1) // 2, dtype=torch.int32)
        else:
            s = ((hi - lo) / maxq).clamp(min=1e-5)
            z = torch.round(-lo / s).to(torch.int32)
        scales[g], zeros[g] = s.half().float(), z
    codes = torch.clamp(torch.round(W.t() / scales[g_idx.long()] + zeros[g_idx.long()]), 0, maxq).to(torch.int32)
    return codes, zeros, scales, g_idx


def write_gptq_checkpoint(folder, cfg, bits, group_size, desc_act, sym, fmt, file_name="model.safetensors",
                          config_place="quantize_config.json", distinct_perms=False):
    """Quantize a random HF model into a GPTQ folder; return the HF model holding the dequantized weights."""
    hf = write_hf_checkpoint(folder, cfg)
    state = {k: v for k, v in hf.state_dict().items() if not any(f".{lin}." in k for lin in LINEARS)}
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight")
    for i, (name, module) in enumerate(hf.named_modules()):
        if name.rsplit(".", 1)[-1] not in LINEARS:
            continue
        seed = i if distinct_perms else 0
        codes, zeros, scales, g_idx = naive_quantize(module.weight.data, bits, group_size, desc_act, sym, seed)
        if fmt == "gptq" and not sym:
            zeros = zeros.clamp(min=1)  # v1 cannot store a zero point of 0
        t = pack.pack(codes, zeros, scales, g_idx, bits, fmt,
                      bias=module.bias.data if module.bias is not None else None)
        for kind in ("qweight", "qzeros", "scales", "g_idx", "bias"):
            if getattr(t, kind) is not None:
                state[f"{name}.{kind}"] = getattr(t, kind)
        with torch.no_grad():
            module.weight.copy_(pack.dequantize(t, bits, fmt, module.in_features, torch.float32))
            if module.bias is not None:
                module.bias.copy_(t.bias.float())
    (folder / "model.safetensors").unlink()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / file_name))
    qcfg = dict(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym, damp_percent=0.01,
                static_groups=False, true_sequential=True, quant_method="gptq", checkpoint_format=fmt)
    if config_place == "config.json":
        raw = json.loads((folder / "config.json").read_text())
        raw["quantization_config"] = qcfg
        (folder / "config.json").write_text(json.dumps(raw))
    else:
        (folder / config_place).write_text(json.dumps(qcfg))
    return hf


CASES = [
    (bits, gs, act, sym, fmt)
    for bits, gs, act, sym, fmt in itertools.product((2, 3, 4, 8), (-1, 32, 128), (False, True), (True, False),
                                                     ("gptq", "gptq_v2"))
    if not (gs == -1 and act)  # act-order with one group is the same file as without
]


@pytest.mark.parametrize("bits,group_size,desc_act,sym,fmt", CASES)
def test_gptq_variant_logits(tmp_path, bits, group_size, desc_act, sym, fmt):
    cfg = tiny_config(hidden_size=160, intermediate_size=224, num_attention_heads=5, num_key_value_heads=5)
    hf = write_gptq_checkpoint(tmp_path, cfg, bits, group_size, desc_act, sym, fmt)
    model, ckpt = load_model(tmp_path, backend="reference")
    assert ckpt.quant.bits == bits and ckpt.quant.checkpoint_format == fmt
    tokens = torch.randint(0, cfg["vocab_size"], (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("file_name,config_place", [
    ("gptq_model-4bit-128g.safetensors", "quantize_config.json"),
    ("vicuna-7b-v1.3-GPTQ-4bit-128g.no-act.order.safetensors", "quant_config.json"),
    ("Guanaco-65B-GPTQ-4bit.act-order.safetensors", "config.json"),
])
def test_any_file_name_and_config_place(tmp_path, file_name, config_place):
    """Smollm2-like shape: 576-wide rows at group 128 give a partial last group; GQA with 3 kv heads."""
    cfg = tiny_config(hidden_size=576, intermediate_size=192, num_attention_heads=9, num_key_value_heads=3,
                      num_hidden_layers=1, tie_word_embeddings=True, attention_bias=True)
    hf = write_gptq_checkpoint(tmp_path, cfg, 4, 128, "act-order" in file_name, True, "gptq", file_name, config_place)
    model, _ = load_model(tmp_path)
    tokens = torch.randint(0, cfg["vocab_size"], (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)


def test_parts_with_different_act_order_stay_separate(tmp_path):
    """q/k/v (or gate/up) whose g_idx differ cannot share one packed tensor; they still give the same logits."""
    from lowbit.model.linear import ConcatLinear

    cfg = tiny_config()
    hf = write_gptq_checkpoint(tmp_path, cfg, 4, 32, True, True, "gptq", distinct_perms=True)
    model, _ = load_model(tmp_path)
    assert isinstance(model.layers[0].attention.wqkv, ConcatLinear)
    tokens = torch.randint(0, cfg["vocab_size"], (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)


def test_sharded_gptq_checkpoint(tmp_path):
    from lowbit.model.checkpoint import write_shards
    from safetensors.torch import load_file

    cfg = tiny_config()
    hf = write_gptq_checkpoint(tmp_path, cfg, 4, 32, True, False, "gptq_v2")
    tensors = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    write_shards(tmp_path, sorted(tensors.items()), max_shard_bytes=20_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    model, _ = load_model(tmp_path)
    tokens = torch.randint(0, cfg["vocab_size"], (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)


def test_qweight_shape_mismatch_is_one_clear_error(tmp_path):
    from safetensors.torch import load_file

    write_gptq_checkpoint(tmp_path, tiny_config(), 4, 32, False, True, "gptq")
    tensors = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.scales"
    tensors[name] = tensors[name][:1]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(LowbitError, match=r"q_proj: scales has shape \(1, 64\)"):
        load_model(tmp_path)


def test_bits_5_is_refused(tmp_path):
    write_gptq_checkpoint(tmp_path, tiny_config(), 4, 32, False, True, "gptq")
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 5, "group_size": 32}))
    with pytest.raises(LowbitError, match="bits=5"):
        load_model(tmp_path)


def test_dense_backend_equals_reference(tmp_path):
    cfg = tiny_config()
    write_gptq_checkpoint(tmp_path, cfg, 3, 32, True, False, "gptq_v2")
    dense, _ = load_model(tmp_path, backend="dense")
    reference, _ = load_model(tmp_path, backend="reference")
    assert dense.layers[0].mlp.w2.backend == "dense" and reference.layers[0].mlp.w2.backend == "reference"
    tokens = torch.randint(0, cfg["vocab_size"], (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(dense(tokens), reference(tokens), atol=0, rtol=0)
