"""LoRA adapters written by hand in PEFT's layout (peft's get_peft_model_state_dict names, adapter_config.json
fields), merged by lowbit.model.lora and compared with a naive merge written out here; quantizing with
`lora=` equals quantizing the naively merged folder."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.config import QuantConfig
from lowbit.errors import LowbitError
from lowbit.model.lora import merge_adapter
from lowbit.model.source import TensorFiles
from lowbit.quant.job import quantize
from tests.quant.tiny import CALIB, calib_tokens, one_thread, write_tiny_model  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["q_proj", "v_proj", "down_proj"]


def write_adapter(folder: Path, base: dict, modules: list[str], r: int = 4, alpha: float = 8, seed: int = 0,
                  **config) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's files for a LoRA on `modules` (HF module paths); returns {module: (A, B)}."""
    g = torch.Generator().manual_seed(seed)
    tensors, factors = {}, {}
    for module in modules:
        out_f, in_f = base[f"{module}.weight"].shape
        rank = config.get("rank_pattern", {}).get(module.rpartition(".")[2], r)
        A, B = torch.randn(rank, in_f, generator=g) * 0.3, torch.randn(out_f, rank, generator=g) * 0.3
        tensors[f"base_model.model.{module}.lora_A.weight"] = A
        tensors[f"base_model.model.{module}.lora_B.weight"] = B
        factors[module] = (A, B)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny", "r": r,
           "lora_alpha": alpha, "lora_dropout": 0.05, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
           "target_modules": sorted({m.rpartition(".")[2] for m in modules}), "modules_to_save": None,
           "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True, "use_dora": False, **config}
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return factors


def naive_merge(base: dict, factors: dict, scaling) -> dict:
    merged = dict(base)
    for module, (A, B) in factors.items():
        s = scaling(module, A.shape[0])
        merged[f"{module}.weight"] = base[f"{module}.weight"] + (B @ A) * s
    return merged


def layer_modules(layers=(0, 1)) -> list[str]:
    short = {"q_proj": "self_attn", "v_proj": "self_attn", "down_proj": "mlp"}
    return [f"model.layers.{i}.{short[t]}.{t}" for i in layers for t in TARGETS]


@pytest.fixture
def base(tmp_path) -> Path:
    return write_tiny_model(tmp_path / "float", tokenizer=False)


def merged_view(folder: Path, adapter: Path) -> dict:
    view = merge_adapter(TensorFiles([folder / "model.safetensors"]), adapter)
    return {name: view.get(name) for name in view.keys()}


def test_merge_equals_naive_merge(tmp_path, base):
    sd = load_file(base / "model.safetensors")
    factors = write_adapter(tmp_path / "lora", sd, layer_modules(), r=4, alpha=8)
    got = merged_view(base, tmp_path / "lora")
    want = naive_merge(sd, factors, lambda module, r: 8 / 4)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
        if not any(name.startswith(m) for m in factors):
            assert torch.equal(got[name], sd[name])  # untouched tensors come through as they are
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"], sd["model.layers.0.self_attn.q_proj.weight"])


def test_rslora_patterns_embedding_bias_and_whole_tensors(tmp_path, caplog):
    base = write_tiny_model(tmp_path / "float", tokenizer=False, attention_bias=True)
    sd = load_file(base / "model.safetensors")
    modules = layer_modules((0,))
    factors = write_adapter(tmp_path / "lora", sd, modules, r=4, alpha=16, use_rslora=True, fan_in_fan_out=True,
                            rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3})
    g = torch.Generator().manual_seed(9)
    vocab, dim = sd["model.embed_tokens.weight"].shape
    emb_A, emb_B = torch.randn(4, vocab, generator=g), torch.randn(dim, 4, generator=g)
    lora_bias = torch.randn(sd["model.layers.0.self_attn.q_proj.bias"].shape, generator=g)
    head = torch.randn(sd["lm_head.weight"].shape, generator=g)
    emb_copy = sd["model.embed_tokens.weight"] + 1.0
    extra = {
        "base_model.model.model.embed_tokens.lora_embedding_A": emb_A,  # PEFT's Embedding: nn.Parameter, no .weight
        "base_model.model.model.embed_tokens.lora_embedding_B": emb_B,
        # a targeted embedding is saved whole as well (save_embedding_layers); the delta goes on top of it
        "base_model.model.model.embed_tokens.base_layer.weight": emb_copy,
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias": lora_bias,  # lora_bias=True
        "base_model.model.lm_head.weight": head,  # modules_to_save=["lm_head"]: the trained module, whole
    }
    tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    save_file({**tensors, **extra}, tmp_path / "lora" / "adapter_model.safetensors")

    def scaling(module, r):
        alpha = 3 if module.endswith("v_proj") else 16
        return alpha / math.sqrt(r)

    want = naive_merge(sd, factors, scaling)
    want["model.embed_tokens.weight"] = emb_copy + (emb_B @ emb_A).t() * (16 / 2)
    want["model.layers.0.self_attn.q_proj.bias"] = (sd["model.layers.0.self_attn.q_proj.bias"]
                                                    + lora_bias * scaling("q_proj", 4))
    want["lm_head.weight"] = head
    with caplog.at_level(logging.WARNING, logger="lowbit.model.lora"):
        got = merged_view(base, tmp_path / "lora")
    assert "fan_in_fan_out" in caplog.text
    assert factors["model.layers.0.mlp.down_proj"][0].shape[0] == 2
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)


def test_quantize_with_lora_equals_quantizing_the_merged_model(tmp_path, base):
    sd = load_file(base / "model.safetensors")
    factors = write_adapter(tmp_path / "lora", sd, layer_modules(), r=8, alpha=16)
    merged = tmp_path / "merged"
    shutil.copytree(base, merged)
    save_file(naive_merge(sd, factors, lambda m, r: 16 / 8), merged / "model.safetensors", metadata={"format": "pt"})
    quant = QuantConfig(bits=4, group_size=32, desc_act=True)
    quantize(base, tmp_path / "q-lora", quant, CALIB, tokens=calib_tokens(), lora=tmp_path / "lora")
    quantize(merged, tmp_path / "q-merged", quant, CALIB, tokens=calib_tokens())
    a, b = load_file(tmp_path / "q-lora" / "model.safetensors"), load_file(tmp_path / "q-merged" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "LoRA adapter `lora` was merged" in (tmp_path / "q-lora" / "README.md").read_text()
    plain = tmp_path / "q-plain"
    quantize(base, plain, quant, CALIB, tokens=calib_tokens())
    assert not torch.equal(load_file(plain / "model.safetensors")["model.layers.0.self_attn.q_proj.qweight"],
                           a["model.layers.0.self_attn.q_proj.qweight"])


def _adapter(folder, base, **config):
    write_adapter(folder, load_file(base / "model.safetensors"), layer_modules((0,)), **config)
    return folder


def _retensor(folder: Path, change) -> None:
    tensors = load_file(folder / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, folder / "adapter_model.safetensors")


def test_bad_adapters_are_refused_before_any_work(tmp_path, base):
    files = TensorFiles([base / "model.safetensors"])
    cases = []

    dora = _adapter(tmp_path / "dora", base, use_dora=True)
    cases.append((dora, "DoRA"))
    magnitude = _adapter(tmp_path / "magnitude", base)  # DoRA's tensors without the flag
    _retensor(magnitude, lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector":
                                             torch.ones(64)}))
    cases.append((magnitude, "DoRA"))
    ia3 = _adapter(tmp_path / "ia3", base)
    (ia3 / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "lora_alpha": 1}))
    cases.append((ia3, "IA3 adapter"))

    pickled = _adapter(tmp_path / "pickled", base)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    cases.append((pickled, "adapter_model.bin is a pickle file"))

    bigger = tmp_path / "bigger"  # an adapter for a model with a wider hidden size
    write_adapter(bigger, {"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 128)},
                  ["model.layers.0.self_attn.q_proj"])
    cases.append((bigger, "is 64x128, the model's tensor is 64x64"))

    deeper = tmp_path / "deeper"  # an adapter for a model with more layers
    write_adapter(deeper, {"model.layers.7.mlp.up_proj.weight": torch.zeros(80, 64)}, ["model.layers.7.mlp.up_proj"])
    cases.append((deeper, "changes model.layers.7.mlp.up_proj.weight, which the model does not have"))

    half = tmp_path / "half"
    shutil.copytree(tmp_path / "bigger", half)
    _retensor(half, lambda t: t.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"))
    cases.append((half, "lacks one of its LoRA factors"))

    ranks = _adapter(tmp_path / "ranks", base)
    q_b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    _retensor(ranks, lambda t: t.update({q_b: torch.zeros(64, 3)}))
    cases.append((ranks, "do not share a rank"))

    named = _adapter(tmp_path / "named", base)  # keys with the adapter name left in are not PEFT's saved layout
    up_a = "base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight"
    _retensor(named, lambda t: t.update({up_a: torch.zeros(4, 64)}))
    cases.append((named, "unsupported adapter tensor"))

    cases.append((tmp_path / "nowhere", "no such adapter folder"))
    for folder, match in cases:
        with pytest.raises(LowbitError, match=match):
            merge_adapter(files, folder)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(LowbitError, match="DoRA"):
        quantize(base, tmp_path / "q", QuantConfig(), CALIB, tokens=calib_tokens(), lora=dora)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
