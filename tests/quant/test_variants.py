"""Variants in one go: strict names, the seeds' branch names, one folder per variant equal to a single run,
calibration prepared once, one combined card, and an interrupted set that resumes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lowbit.config import QuantConfig
from lowbit.errors import LowbitError
from lowbit.quant import job, variants
from lowbit.quant.card import format_size
from lowbit.quant.job import quantize
from lowbit.quant.variants import SEEDS_VARIANTS, VariantSpec, parse_variants, quantize_variants
from tests.quant.tiny import CALIB, calib_tokens

pytestmark = pytest.mark.usefixtures("one_thread")


def test_seeds_names_and_branches():
    specs = parse_variants(SEEDS_VARIANTS)
    assert [s.branch for s in specs] == [
        "main", "gptq-4bit-32g-actorder_True", "gptq-4bit-64g-actorder_True", "gptq-4bit-128g-actorder_True",
        "gptq-8bit--1g-actorder_True", "gptq-3bit-128g-actorder_True"]
    assert specs[4] == VariantSpec(bits=8, group_size=-1, desc_act=True)
    assert [s.name for s in specs] == SEEDS_VARIANTS.split(",")
    assert parse_variants(" 4bit-32g ,2bit-64g")[0].branch == "gptq-4bit-32g-actorder_False"
    base = QuantConfig(sym=False, damp_percent=0.1, checkpoint_format="gptq_v2")
    assert specs[1].quant(base) == QuantConfig(bits=4, group_size=32, desc_act=True, sym=False, damp_percent=0.1,
                                               checkpoint_format="gptq_v2")


@pytest.mark.parametrize("text,match", [
    ("4bit-128g,4bit-128", "unknown variant '4bit-128'"),
    ("4bit-128g-actorder_True", "unknown variant"),
    ("4bits-128g", "unknown variant"),
    ("4bit-128g-ActOrder", "unknown variant"),
    ("main", "unknown variant 'main'"),
    ("5bit-128g", "variant '5bit-128g': unsupported GPTQ bits=5"),
    ("4bit-0g", "group_size must be -1 or positive"),
    ("4bit-128g,4bit-128g", "listed twice"),
    ("4bit-128g,,3bit-128g", "comma-separated"),
    ("", "comma-separated"),
])
def test_bad_names_are_refused(text, match):
    with pytest.raises(LowbitError, match=match):
        parse_variants(text)


def test_variants_folders_card_and_one_calibration(tmp_path, tiny_model, monkeypatch):
    calls = []

    def windows(source, ckpt, calib):
        calls.append(calib)
        return calib_tokens()

    monkeypatch.setattr(variants, "calibration_tokens", windows)
    names = "4bit-128g,4bit-32g-actorder,8bit--1g-actorder,3bit-32g"
    base = QuantConfig(sym=False)
    report = quantize_variants(tiny_model, tmp_path / "out", names, base, CALIB)
    assert len(calls) == 1
    out = tmp_path / "out"
    branches = ["main", "gptq-4bit-32g-actorder_True", "gptq-8bit--1g-actorder_True", "gptq-3bit-32g-actorder_False"]
    assert sorted(p.name for p in out.iterdir()) == sorted(branches + ["README.md"])
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left
    card = (out / "README.md").read_text()
    for spec, branch in zip(parse_variants(names), branches):
        folder = out / branch
        assert (folder / "README.md").read_text() == card
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        exllama = "Yes" if spec.bits == 4 else "No"
        gs = "None" if spec.group_size == -1 else str(spec.group_size)
        act = "Yes" if spec.desc_act else "No"
        assert f"| {branch} | {spec.bits} | {gs} | {act} | 0.01 | {CALIB.dataset} | 32 | {format_size(size)} | " \
               f"{exllama} | gptq |" in card
        # each folder is exactly what a single run with the same settings writes
        single = tmp_path / "single" / branch
        quantize(tiny_model, single, spec.quant(base), CALIB, tokens=calib_tokens())
        ref, got = load_file(single / "model.safetensors"), load_file(folder / "model.safetensors")
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
        assert (single / "quantize_config.json").read_text() == (folder / "quantize_config.json").read_text()
    assert set(report.reports) == set(branches)
    assert all(r.out_dir == out / branch for branch, r in report.reports.items())


class Interrupt(Exception):
    pass


def test_interrupted_variants_resume(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(variants, "calibration_tokens", lambda source, ckpt, calib: calib_tokens())
    monkeypatch.setattr(job, "INPUTS_SAVE_SECONDS", 0.0)
    names = "4bit-32g,2bit-32g-actorder"
    layers: list[tuple[int, int]] = []

    def second_variant_layer_0(result):
        layers.append((result.layer, len(layers)))
        if len(layers) == 3:  # variant 1 done (layers 0, 1), variant 2 interrupted after its layer 0
            raise Interrupt

    with pytest.raises(Interrupt):
        quantize_variants(tiny_model, tmp_path / "out", names, QuantConfig(), CALIB, on_layer=second_variant_layer_0)
    stage = tmp_path / ".out.variants-partial"
    assert not (tmp_path / "out").exists()
    assert (stage / "gptq-4bit-32g-actorder_False" / "quantize_config.json").exists()

    with pytest.raises(LowbitError, match="cannot resume .*variants="):
        quantize_variants(tiny_model, tmp_path / "out", "4bit-32g", QuantConfig(), CALIB, resume=True)
    with pytest.raises(LowbitError, match="cannot resume .*sym=True.*this one sym=False"):
        quantize_variants(tiny_model, tmp_path / "out", names, QuantConfig(sym=False), CALIB, resume=True)

    redone: list[int] = []
    report = quantize_variants(tiny_model, tmp_path / "out", names, QuantConfig(), CALIB, resume=True,
                               on_layer=lambda r: redone.append(r.layer))
    assert redone == [1]  # only the second variant's last layer was left
    assert report.reports["gptq-4bit-32g-actorder_False"] is None
    fresh = tmp_path / "fresh"
    quantize_variants(tiny_model, fresh, names, QuantConfig(), CALIB)
    for branch in ("gptq-4bit-32g-actorder_False", "gptq-2bit-32g-actorder_True"):
        ref = load_file(fresh / branch / "model.safetensors")
        got = load_file(tmp_path / "out" / branch / "model.safetensors")
        assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert (fresh / "README.md").read_text() == (tmp_path / "out" / "README.md").read_text()
    assert not stage.exists() and not (tmp_path / "out" / variants.STATE).exists()


def test_existing_output_and_overwrite(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(variants, "calibration_tokens", lambda source, ckpt, calib: calib_tokens())
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(LowbitError, match="already exists"):
        quantize_variants(tiny_model, out, "4bit-32g", QuantConfig(), CALIB)
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    quantize_variants(tiny_model, out, "4bit-32g", QuantConfig(), CALIB, method="rtn", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "gptq-4bit-32g-actorder_False"]
    assert json.loads((out / "gptq-4bit-32g-actorder_False" / "quantize_config.json").read_text())["method"] == "rtn"
    assert "none (RTN)" in (out / "README.md").read_text()
