"""apply_delta against FastChat's semantics written out naively: OUT = BASE + DELTA per tensor, the rows a
larger delta vocabulary adds taken from the delta, the delta's config and tokenizer, errors before writing."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.errors import LowbitError
from lowbit.model.delta import apply_delta
from lowbit.model.weights import load_model
from tests.quant.tiny import VOCAB, one_thread, write_tiny_model  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def make_delta(base: Path, target: Path, delta: Path) -> None:
    """FastChat's make_delta: target - base (the base's block of a grown embedding / lm_head)."""
    shutil.copytree(target, delta)
    b, t = load_file(base / "model.safetensors"), load_file(target / "model.safetensors")
    for name, bp in b.items():
        if t[name].shape == bp.shape:
            t[name] -= bp
        else:
            t[name][: bp.shape[0], : bp.shape[1]] -= bp
    save_file(t, delta / "model.safetensors", metadata={"format": "pt"})


def reference(base: Path, delta: Path) -> dict:
    """FastChat's apply_delta, naively: delta[:rows, :cols] += base, over the delta's tensors."""
    b, d = load_file(base / "model.safetensors"), load_file(delta / "model.safetensors")
    for name, p in d.items():
        bp = b[name]
        if p.shape == bp.shape:
            p += bp
        else:
            p[: bp.shape[0], : bp.shape[1]] += bp
    return d


def snapshot(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def models(tmp_path):
    base = write_tiny_model(tmp_path / "base", seed=0, tokenizer=False)
    target = write_tiny_model(tmp_path / "target", seed=1, vocab_size=VOCAB + 4)  # Vicuna v0 added tokens
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "note": "target"}))
    make_delta(base, target, tmp_path / "delta")
    return base, target, tmp_path / "delta"


def test_rebuilds_the_target(tmp_path, models):
    base, target, delta = models
    report = apply_delta(base, delta, tmp_path / "out")
    out = tmp_path / "out"
    got, want = load_file(out / "model.safetensors"), reference(base, delta)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
    target_sd = load_file(target / "model.safetensors")
    for name in target_sd:  # and that is the fine-tuned model again, up to float32 rounding
        torch.testing.assert_close(got[name], target_sd[name], rtol=1e-5, atol=1e-5)
    assert set(report.grown) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert got["model.embed_tokens.weight"].shape[0] == VOCAB + 4
    assert torch.equal(got["lm_head.weight"][VOCAB:], load_file(delta / "model.safetensors")["lm_head.weight"][VOCAB:])
    assert json.loads((out / "config.json").read_text())["note"] == "target"  # the delta's config
    assert (out / "tokenizer.json").read_text() == (delta / "tokenizer.json").read_text()
    model, _ = load_model(out)
    assert model.tok_embeddings.weight.shape[0] == VOCAB + 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_float16_sharded_and_tied(tmp_path):
    base = write_tiny_model(tmp_path / "base", seed=0, tokenizer=False, tie_word_embeddings=True)
    target = write_tiny_model(tmp_path / "target", seed=2, tie_word_embeddings=True)
    for folder in (base, target):
        sd = {k: v.half() for k, v in load_file(folder / "model.safetensors").items()}
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    make_delta(base, target, tmp_path / "delta")
    apply_delta(base, tmp_path / "delta", tmp_path / "out", max_shard_bytes=30_000)
    out = tmp_path / "out"
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("model-*.safetensors"))) > 1
    got = {}
    for f in out.glob("model-*.safetensors"):
        got.update(load_file(f))
    b, d = load_file(base / "model.safetensors"), load_file(tmp_path / "delta" / "model.safetensors")
    assert "lm_head.weight" not in got and got.keys() == d.keys()
    for name in d:  # the exact sum rounded once to float16
        assert got[name].dtype == torch.float16
        assert torch.equal(got[name], (b[name].float() + d[name].float()).half())


def test_mismatches_are_refused_and_nothing_written(tmp_path, models):
    base, target, delta = models
    other = write_tiny_model(tmp_path / "wider", hidden_size=32, tokenizer=False)
    deeper = write_tiny_model(tmp_path / "deeper", num_hidden_layers=3, tokenizer=False)
    grown_mlp = write_tiny_model(tmp_path / "grown", intermediate_size=96, tokenizer=False)
    quantized = tmp_path / "gptq"
    shutil.copytree(base, quantized)
    sd = load_file(quantized / "model.safetensors")
    sd["model.layers.0.self_attn.q_proj.qweight"] = torch.zeros(8, 64, dtype=torch.int32)
    save_file(sd, quantized / "model.safetensors")
    before = snapshot(tmp_path)
    cases = [
        (base, other, "the base has shape"),
        (deeper, delta, f"{delta} lacks tensor model.layers.2."),
        (base, deeper, f"{base} lacks tensor model.layers.2."),
        (grown_mlp, delta, "model.layers.0.mlp.down_proj.weight: the base has shape (64, 96), the delta (64, 80)"),
        (target, base, "lm_head.weight: the base has shape (100, 64), the delta (96, 64)"),  # base larger
        (quantized, delta, "GPTQ-quantized"),
        (base, tmp_path / "nowhere", "missing config.json"),
    ]
    for b, d, match in cases:
        with pytest.raises(LowbitError, match=re.escape(match)):
            apply_delta(b, d, tmp_path / "out")
        assert snapshot(tmp_path) == before, match
    (tmp_path / "out").mkdir()
    with pytest.raises(LowbitError, match="already exists"):
        apply_delta(base, delta, tmp_path / "out")
    with pytest.raises(LowbitError, match="must differ"):
        apply_delta(base, delta, base, overwrite=True)
    apply_delta(base, delta, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_pickle_delta_needs_opt_in_and_inv_freq_is_dropped(tmp_path, models):
    base, _, delta = models
    pickled = tmp_path / "pickled"
    shutil.copytree(delta, pickled)
    sd = load_file(pickled / "model.safetensors")
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)  # old LLaMA conversions saved it
    torch.save(sd, pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(LowbitError, match="--allow-pickle"):
        apply_delta(base, pickled, tmp_path / "out")
    apply_delta(base, pickled, tmp_path / "out", allow_pickle=True)
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert not any("inv_freq" in k for k in got)
    want = reference(base, delta)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_delta_without_tokenizer_gets_the_base_one(tmp_path):
    base = write_tiny_model(tmp_path / "base", seed=0)
    target = write_tiny_model(tmp_path / "target", seed=1, tokenizer=False)
    make_delta(base, target, tmp_path / "delta")
    apply_delta(base, tmp_path / "delta", tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()
