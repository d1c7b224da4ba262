"""Whole `quantize` runs on a tiny random LLaMA: the written folder loads back in lowbit with the very weights
the quantizer produced (round trip over bits x act-order x sym x format), an interrupted run resumes to the
same files, and bad requests are refused before anything is written."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.config import CalibrationConfig, QuantConfig
from lowbit.errors import LowbitError
from lowbit.model.weights import load_model
from lowbit.quant import job
from lowbit.quant.card import format_size
from lowbit.quant.job import quantize
from tests.quant.tiny import CALIB, VOCAB, calib_tokens, write_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def run(src: Path, out: Path, quant: QuantConfig, **kwargs) -> dict[int, dict]:
    """Quantize src -> out and return the quantizer's results per layer (as on_layer saw them)."""
    seen: dict[int, dict] = {}
    kwargs.setdefault("tokens", calib_tokens())
    quantize(src, out, quant, CALIB, on_layer=lambda r: seen.__setitem__(r.layer, r.results), **kwargs)
    return seen


def fake_quantized(src: Path, results: dict[int, dict]) -> torch.nn.Module:
    """The float model with every linear weight replaced by the quantizer's dequantized W_q, and the
    unquantized tensors (embeddings, norms, lm_head) rounded to float16 as GPTQ files store them."""
    model, _ = load_model(src)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
        for layer, linears in results.items():
            for name, r in linears.items():
                model.layers[layer].get_submodule(name).weight.copy_(r.W_q)
    return model


def logits(model, seed: int = 1) -> torch.Tensor:
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(tokens)


def snapshot(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ----------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trip_equals_fake_quantized_model(tmp_path, tiny_model, bits, desc_act, sym, fmt):
    quant = QuantConfig(bits=bits, group_size=32, desc_act=desc_act, sym=sym, checkpoint_format=fmt)
    results = run(tiny_model, tmp_path / "q", quant)
    written = json.loads((tmp_path / "q" / "quantize_config.json").read_text())
    assert written["checkpoint_format"] == fmt and written["bits"] == bits and written["desc_act"] == desc_act
    loaded, ckpt = load_model(tmp_path / "q")
    assert ckpt.quant == quant
    g_idx = loaded.layers[0].attention.wqkv.g_idx
    if desc_act:  # act-order really happened: some g_idx goes down
        assert (g_idx[1:] < g_idx[:-1]).any()
    else:  # GAR (the default without act-order) leaves the file plain
        assert written["meta"]["act_group_aware"] and (g_idx[1:] >= g_idx[:-1]).all()
    torch.testing.assert_close(logits(loaded), logits(fake_quantized(tiny_model, results)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,static,gar", [("gptq", True, None), ("rtn", False, None), ("gptq", False, False),
                                               ("gptq", True, True)])
def test_round_trip_static_groups_and_rtn(tmp_path, tiny_model, method, static, gar):
    """Static groups under act-order (gar None) and under GAR; RTN; plain GPTQ order (GAR off)."""
    quant = QuantConfig(bits=4, group_size=32, desc_act=static and not gar, static_groups=static, sym=False,
                        act_group_aware=gar)
    results = run(tiny_model, tmp_path / "q", quant, method=method, tokens=calib_tokens() if method == "gptq" else None)
    loaded, _ = load_model(tmp_path / "q")
    torch.testing.assert_close(logits(loaded), logits(fake_quantized(tiny_model, results)), rtol=1e-5, atol=1e-5)


def test_zero_point_v1_cannot_store_switches_to_v2(tmp_path, caplog):
    """A group with no negative weight has asymmetric zero point 0, which v1 files cannot hold."""
    src = write_tiny_model(tmp_path / "float", tokenizer=False)
    sd = load_file(src / "model.safetensors")
    sd["model.layers.1.mlp.down_proj.weight"][:, 32:64] = sd["model.layers.1.mlp.down_proj.weight"][:, 32:64].abs()
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="lowbit.quant.export"):
        results = run(src, tmp_path / "q", QuantConfig(bits=4, group_size=32, sym=False), method="rtn", tokens=None)
    assert "gptq_v2" in caplog.text
    assert json.loads((tmp_path / "q" / "quantize_config.json").read_text())["checkpoint_format"] == "gptq_v2"
    loaded, _ = load_model(tmp_path / "q")
    torch.testing.assert_close(logits(loaded), logits(fake_quantized(src, results)), rtol=1e-5, atol=1e-5)


def test_output_folder_contents(tmp_path, tiny_model):
    run(tiny_model, tmp_path / "q", QuantConfig(bits=4, group_size=32, desc_act=True), max_shard_bytes=20_000)
    out = tmp_path / "q"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "quantize_config.json", "README.md", "tokenizer.json",
            "model.safetensors.index.json"} <= names
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq" and config["quantization_config"]["desc_act"]
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    row = (f"| gptq-4bit-32g-actorder_True | 4 | 32 | Yes | 0.01 | {CALIB.dataset} | 32 | {format_size(size)} "
           "| Yes | gptq |")
    assert row in (out / "README.md").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # no hidden partial or temp folder left beside it


# ----------------------------------------------------------------------------- resume

class Interrupt(Exception):
    pass


def interrupt_after(k: int):
    def hook(result):
        if result.layer == k:
            raise Interrupt
    return hook


@pytest.mark.parametrize("method,k", [("gptq", 0), ("gptq", 1), ("rtn", 1)])
def test_resume_after_interrupt_equals_uninterrupted_run(tmp_path, monkeypatch, method, k):
    monkeypatch.setattr(job, "INPUTS_SAVE_SECONDS", 0.0)  # save activations after every layer
    src = write_tiny_model(tmp_path / "float", num_hidden_layers=3, tokenizer=False)
    quant = QuantConfig(bits=3, group_size=32, desc_act=True, sym=False)
    tokens = calib_tokens() if method == "gptq" else None
    quantize(src, tmp_path / "ref", quant, CALIB, method=method, tokens=tokens)

    out = tmp_path / "q"
    with pytest.raises(Interrupt):
        quantize(src, out, quant, CALIB, method=method, tokens=tokens, on_layer=interrupt_after(k))
    assert not out.exists()
    partial = tmp_path / ".q.partial"
    assert json.loads((partial / "progress.json").read_text())["layers_done"] == k + 1

    redone: list[int] = []
    quantize(src, out, quant, CALIB, method=method, tokens=tokens, resume=True,
             on_layer=lambda r: redone.append(r.layer))
    assert redone == list(range(k + 1, 3))  # started after the last finished layer
    assert not partial.exists()
    ref, got = load_file(tmp_path / "ref" / "model.safetensors"), load_file(out / "model.safetensors")
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[name], got[name]) for name in ref)
    for name in ("config.json", "quantize_config.json"):
        assert (tmp_path / "ref" / name).read_text() == (out / name).read_text()


def test_resume_with_other_settings_is_refused(tmp_path):
    src = write_tiny_model(tmp_path / "float", tokenizer=False)
    quant = QuantConfig(bits=4, group_size=32)
    tokens = calib_tokens()
    with pytest.raises(Interrupt):
        quantize(src, tmp_path / "q", quant, CALIB, tokens=tokens, on_layer=interrupt_after(0))
    before = snapshot(tmp_path)
    other = QuantConfig(bits=3, group_size=32)
    with pytest.raises(LowbitError, match=r"cannot resume .*bits=4.*this one bits=3.*without --resume"):
        quantize(src, tmp_path / "q", other, CALIB, tokens=tokens, resume=True)
    with pytest.raises(LowbitError, match="other calibration data"):
        quantize(src, tmp_path / "q", quant, CALIB, tokens=calib_tokens(seed=5), resume=True)
    assert snapshot(tmp_path) == before  # the interrupted run's work is kept
    redone: list[int] = []  # without --resume the old work is dropped and the run starts over
    quantize(src, tmp_path / "q", other, CALIB, tokens=tokens, on_layer=lambda r: redone.append(r.layer))
    assert redone == [0, 1]


# ----------------------------------------------------------------------------- refused before any work

def test_bad_requests_write_nothing(tmp_path, tiny_model):
    (tmp_path / "exists").mkdir()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(tiny_model / "config.json", no_weights / "config.json")
    before = snapshot(tmp_path)
    quant = QuantConfig()
    cases = [
        (tiny_model, tmp_path / "exists", CALIB, "already exists"),
        (no_weights, tmp_path / "out", CALIB, "no weights found"),
        (tiny_model, tmp_path / "out", CalibrationConfig(dataset=str(empty), nsamples=2, seqlen=8), "no text found"),
        (tiny_model, tiny_model, CALIB, "already exists"),
    ]
    for src, out, calib, match in cases:
        with pytest.raises(LowbitError, match=match):
            quantize(src, out, quant, calib)
        assert snapshot(tmp_path) == before, match
    with pytest.raises(LowbitError, match="bits=5"):
        QuantConfig(bits=5)
    with pytest.raises(LowbitError, match="unknown method"):
        quantize(tiny_model, tmp_path / "out", quant, CALIB, method="awq")
    assert snapshot(tmp_path) == before


def test_unquantized_tensors_are_written_in_float16(tmp_path, tiny_model):
    """ExLlama and TGI read GPTQ checkpoints as float16 throughout, whatever the source's dtype."""
    run(tiny_model, tmp_path / "q", QuantConfig(bits=4, group_size=32), method="rtn", tokens=None)
    from safetensors import safe_open

    with safe_open(str(next((tmp_path / "q").glob("*.safetensors"))), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {d for k, d in dtypes.items() if k.endswith(("norm.weight", "embed_tokens.weight", "scales"))} == {"F16"}
    assert json.loads((tmp_path / "q" / "config.json").read_text())["torch_dtype"] == "float16"
