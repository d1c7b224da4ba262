"""Several quantizations of one model in one go, as the GPTQ releases on the Hub publish them: one folder per
variant, named like their branches (`main`, `gptq-4bit-32g-actorder_True`, ...), and one model card with
the table of all of them.

Owns the variant names (`4bit-128g`, `4bit-32g-actorder`, `8bit--1g-actorder`: bits, group size, act-order),
the branch names, and `quantize_variants`: calibration windows prepared once, each variant quantized by
`lowbit.quant.job.quantize` into a hidden staging folder (resumable, variant by variant), then the whole
folder published at once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.config import CalibrationConfig, QuantConfig
from lowbit.errors import LowbitError
from lowbit.model.checkpoint import publish
from lowbit.quant.card import Variant, branch_name, model_card
from lowbit.quant.export import settings_difference
from lowbit.quant.job import QuantizeReport, calibration_tokens, check_request, quantize, run_settings

log = logging.getLogger(__name__)

NAME = re.compile(r"(\d+)bit-(-1|\d+)g(-actorder)?")
NAME_FORMAT = "BITSbit-GROUPg[-actorder], e.g. 4bit-128g, 4bit-32g-actorder, 8bit--1g-actorder"
SEEDS_VARIANTS = "4bit-128g,4bit-32g-actorder,4bit-64g-actorder,4bit-128g-actorder,8bit--1g-actorder,3bit-128g-actorder"
STATE = "variants.json"


@dataclass(frozen=True)
class VariantSpec:
    """What a variant name fixes; every other setting comes from the run's base QuantConfig."""

    bits: int
    group_size: int
    desc_act: bool

    @property
    def name(self) -> str:
        return f"{self.bits}bit-{self.group_size}g" + ("-actorder" if self.desc_act else "")

    @property
    def branch(self) -> str:
        return branch_name(self.bits, self.group_size, self.desc_act)

    def quant(self, base: QuantConfig) -> QuantConfig:
        return dataclasses.replace(base, bits=self.bits, group_size=self.group_size, desc_act=self.desc_act)


@dataclass(frozen=True)
class VariantsReport:
    out_dir: Path
    reports: dict[str, QuantizeReport | None]  # branch -> this run's report (None: finished by an earlier run)
    variants: list[Variant]  # as the card lists them: final format, size, branch


def parse_variants(text: str) -> list[VariantSpec]:
    """'4bit-128g,4bit-32g-actorder' -> specs, strictly: every name must match the grammar and be valid."""
    names = [n.strip() for n in text.split(",")]
    if not text.strip() or not all(names):
        raise LowbitError(f"--variants needs a comma-separated list of names like {NAME_FORMAT}")
    specs = []
    for name in names:
        m = NAME.fullmatch(name)
        if m is None:
            raise LowbitError(f"unknown variant {name!r}; variant names look like {NAME_FORMAT}")
        spec = VariantSpec(int(m[1]), int(m[2]), m[3] is not None)
        try:
            QuantConfig(bits=spec.bits, group_size=spec.group_size)
        except LowbitError as e:
            raise LowbitError(f"variant {name!r}: {e}") from None
        if spec in specs:
            raise LowbitError(f"variant {name!r} is listed twice")
        specs.append(spec)
    return specs


def quantize_variants(source: Path, out_dir: Path, variants: list[VariantSpec] | str, base: QuantConfig,
                      calib: CalibrationConfig, method: str = "gptq", mse: bool = False,
                      device: torch.device = torch.device("cpu"), resume: bool = False, overwrite: bool = False,
                      progress: bool = False, lora: Path | None = None, **quantize_kwargs) -> VariantsReport:
    """Quantize `source` once per variant into OUT_DIR/<branch>/, with one combined model card.

    OUT_DIR appears only when every variant is done. Until then the work lives in a hidden sibling,
    `.OUT_DIR.variants-partial`, which `resume` continues (finished variants are kept, an unfinished one
    resumes from its last finished layer); settings other than the interrupted run's are refused.
    """
    specs = parse_variants(variants) if isinstance(variants, str) else list(variants)
    if not specs:
        raise LowbitError("no variants to quantize")
    ckpt = check_request(source, out_dir, overwrite)
    settings = {"variants": [s.name for s in specs], **run_settings(source, base, calib, method, mse, lora)}
    stage = _stage(out_dir, settings, resume)
    tokens = calibration_tokens(source, ckpt, calib) if method == "gptq" else None
    reports: dict[str, QuantizeReport | None] = {}
    for i, spec in enumerate(specs):
        folder = stage / spec.branch
        if (folder / "quantize_config.json").exists():
            log.info("variant %s already done in an earlier run", spec.name)
            reports[spec.branch] = None
            continue
        log.info("variant %d/%d: %s -> %s", i + 1, len(specs), spec.name, spec.branch)
        reports[spec.branch] = quantize(source, folder, spec.quant(base), calib, method=method, mse=mse,
                                        device=device, resume=resume, progress=progress, tokens=tokens, lora=lora,
                                        **quantize_kwargs)
    listed = [_finished_variant(stage / s.branch, s.branch, calib if method == "gptq" else None) for s in specs]
    card = model_card(ckpt, listed, source_name=ckpt.folder.name, lora_name=Path(lora).name if lora else None)
    for target in [stage, *(stage / s.branch for s in specs)]:
        (target / "README.md").write_text(card)
    publish(stage, out_dir)
    (out_dir / STATE).unlink()
    published = {b: r and dataclasses.replace(r, out_dir=out_dir / b) for b, r in reports.items()}
    return VariantsReport(out_dir, published, listed)


def _stage(out_dir: Path, settings: dict, resume: bool) -> Path:
    """The staging folder: kept when resuming with the same settings, else started afresh."""
    stage = out_dir.with_name(f".{out_dir.name}.variants-partial")
    state = stage / STATE
    if stage.exists() and resume and state.exists():
        before = json.loads(state.read_text())
        if before != json.loads(json.dumps(settings)):
            raise LowbitError(f"cannot resume {out_dir}: {settings_difference(before, settings)}; "
                              "run without --resume to start over")
        return stage
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    state.write_text(json.dumps(settings))
    return stage


def _finished_variant(folder: Path, branch: str, calib: CalibrationConfig | None) -> Variant:
    """A finished folder as the card lists it: the format it was written in (v2 if v1 overflowed), its size."""
    quant = QuantConfig.from_dict(json.loads((folder / "quantize_config.json").read_text()))
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return Variant(quant, calib, size, branch)
