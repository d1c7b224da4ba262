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
    branch: str = "main"


def exllama_compatible(q: QuantConfig) -> bool:
    """ExLlama-style loaders read 4-bit GPTQ v1 files only."""
    return q.bits == 4 and q.checkpoint_format == "gptq"


def _row(v: Variant) -> str:
    q, c = v.quant, v.calib
    size = f"{v.size_bytes / 1024**3:.2f} GB" if v.size_bytes else "-"
    gs = "None" if q.group_size == -1 else str(q.group_size)
    dataset = c.dataset if c else "none (RTN)"
    seqlen = str(c.seqlen) if c else "-"
    return (f"| {v.branch} | {q.bits} | {gs} | {'Yes' if q.desc_act else 'No'} | {q.damp_percent:g} | {dataset} | "
            f"{seqlen} | {size} | {'Yes' if exllama_compatible(q) else 'No'} | {q.checkpoint_format} |")


def model_card(ckpt: Checkpoint, variants: list[Variant], source_name: str, template_example: str | None = None) -> str:
    lines = [
        f"# {source_name} — GPTQ",
        "",
        f"GPTQ quantizations of `{source_name}` made with [lowbit](https://pypi.org/project/lowbit/).",
        "",
        "| Branch | Bits | GS | Act Order | Damp % | GPTQ Dataset | Seq Len | Size | ExLlama | Format |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(_row(v) for v in variants),
        "",
        "Bits and GS (group size) set the precision; Act Order (desc_act) quantizes columns in order of",
        "importance; Damp % is the Hessian dampening; the dataset and sequence length are the calibration data.",
        "",
    ]
    if template_example:
        lines += ["## Prompt template", "", "```", template_example, "```", ""]
    lines += [
        "## How to use",
        "",
        "```sh",
        "pip install lowbit",
        "lowbit chat ./THIS_FOLDER",
        "lowbit generate ./THIS_FOLDER \"Tell me about AI\"",
        "```",
        "",
        "With transformers (and a GPTQ backend such as GPTQModel installed):",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(\"./THIS_FOLDER\", device_map=\"auto\")",
        "tokenizer = AutoTokenizer.from_pretrained(\"./THIS_FOLDER\")",
        "```",
        "",
        f"Architecture: {ckpt.config.architecture}, {ckpt.config.num_layers} layers, hidden size "
        f"{ckpt.config.hidden_size}, {ckpt.config.num_params / 1e9:.2f} B parameters.",
        "",
    ]
    return "\n".join(lines)
