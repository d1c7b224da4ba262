"""The model card (README.md) written beside a quantized model, in the style of the GPTQ releases on the Hub:
a table of the variants (Bits | GS | Act Order | Damp % | Dataset | Seq Len | Size | ExLlama), the prompt
template, and how to load the files with lowbit and with transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.config import CalibrationConfig, QuantConfig
from lowbit.model.weights import Checkpoint


@dataclass(frozen=True)
class Variant:
    quant: QuantConfig
    calib: CalibrationConfig | None  # None for round-to-nearest
    size_bytes: int | None = None
    branch: str | None = None  # default: the seeds' branch name for these settings

    @property
    def name(self) -> str:
        return self.branch or branch_name(self.quant.bits, self.quant.group_size, self.quant.desc_act)


def branch_name(bits: int, group_size: int, desc_act: bool) -> str:
    """The seeds' branch names: 'main' for 4-bit 128g without act-order, else gptq-4bit-32g-actorder_True."""
    if (bits, group_size, desc_act) == (4, 128, False):
        return "main"
    return f"gptq-{bits}bit-{group_size}g-actorder_{desc_act}"


def exllama_compatible(q: QuantConfig) -> bool:
    """ExLlama-style loaders read 4-bit GPTQ v1 files only."""
    return q.bits == 4 and q.checkpoint_format == "gptq"


def format_size(nbytes: int) -> str:
    return f"{nbytes / 1024**3:.2f} GB" if nbytes >= 1024**3 else f"{nbytes / 1024**2:.1f} MB"


def _row(v: Variant) -> str:
    q, c = v.quant, v.calib
    size = format_size(v.size_bytes) if v.size_bytes else "-"
    gs = "None" if q.group_size == -1 else str(q.group_size)
    dataset = c.dataset if c else "none (RTN)"
    seqlen = str(c.seqlen) if c else "-"
    return (f"| {v.name} | {q.bits} | {gs} | {'Yes' if q.desc_act else 'No'} | {q.damp_percent:g} | {dataset} | "
            f"{seqlen} | {size} | {'Yes' if exllama_compatible(q) else 'No'} | {q.checkpoint_format} |")


def model_card(ckpt: Checkpoint, variants: list[Variant], source_name: str, template_example: str | None = None,
               lora_name: str | None = None) -> str:
    """README.md for one quantized folder, or for a set of variants (one folder per branch)."""
    folder = "./THIS_FOLDER" if len(variants) == 1 else f"./{variants[-1].name}"
    lines = [
        f"# {source_name} — GPTQ",
        "",
        f"GPTQ quantizations of `{source_name}` made with [lowbit](https://pypi.org/project/lowbit/).",
        "",
    ]
    if lora_name:
        lines += [f"The LoRA adapter `{lora_name}` was merged into the float weights before quantization.", ""]
    if len(variants) > 1:
        lines += ["Each branch is a folder of its own; `main` is the one most loaders pick by default.", ""]
    lines += [
        "| Branch | Bits | GS | Act Order | Damp % | GPTQ Dataset | Seq Len | Size | ExLlama | Format |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(_row(v) for v in variants),
        "",
        "Bits and GS (group size) set the precision; Act Order (desc_act) quantizes columns in order of",
        "importance; Damp % is the Hessian dampening; the dataset and sequence length are the calibration data.",
        "ExLlama: whether ExLlama-style 4-bit loaders (ExLlama, ExLlamaV2) read the files: 4-bit, format gptq (v1).",
        "",
    ]
    if template_example:
        lines += ["## Prompt template", "", "```", template_example, "```", ""]
    lines += [
        "## How to use",
        "",
        "```sh",
        "pip install lowbit",
        f"lowbit chat {folder}",
        f"lowbit generate {folder} \"Tell me about AI\"",
        "```",
        "",
        "With transformers (and a GPTQ backend such as GPTQModel installed):",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"model = AutoModelForCausalLM.from_pretrained(\"{folder}\", device_map=\"auto\")",
        f"tokenizer = AutoTokenizer.from_pretrained(\"{folder}\")",
        "```",
        "",
        f"Architecture: {ckpt.config.architecture}, {ckpt.config.num_layers} layers, hidden size "
        f"{ckpt.config.hidden_size}, {ckpt.config.num_params / 1e9:.2f} B parameters.",
        "",
    ]
    return "\n".join(lines)
