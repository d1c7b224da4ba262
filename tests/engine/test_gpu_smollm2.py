"""The trained SmolLM2 on the GPU fast path (marked gpu and slow): greedy decoding gives the tokens of the
torch reference path (the same weights on the CPU in float32), for the float model and for 4-bit GPTQ
checkpoints made here (round-to-nearest g128, and GPTQ with act-order, calibrated on prose).

float16 cannot reproduce float32 through an exact tie: on the H100 (2026-11-24) one prompt of four left
the float32 path at token 16, where float32's two best logits are 18.6174 and 18.6125 and the torch
reference itself, run on the CPU in float16 or bfloat16, switches the same way. So a divergence passes
only where the fast path took float32's runner-up and the two were within TIE logits."""

from __future__ import annotations

import pytest
import torch

from lowbit.api import load
from lowbit.config import CalibrationConfig, QuantConfig
from lowbit.data import calibration_windows
from lowbit.engine.engine import Engine, EngineConfig
from lowbit.engine.sampling import SamplingParams
from lowbit.model.linear import QuantLinear

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,",
           "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n"]
NEW = 48
TIE = 0.05  # logits


@pytest.fixture(scope="module")
def checkpoints(smollm2_dir, prose, tmp_path_factory):
    from lowbit.model.tokenizer import Tokenizer
    from lowbit.quant.job import quantize

    out = {"float": smollm2_dir}
    tokenizer = Tokenizer.from_pretrained(smollm2_dir)
    tokens = calibration_windows(tokenizer, [prose], nsamples=32, seqlen=512)
    for name, quant, method in (("rtn-4bit-g128", QuantConfig(bits=4, group_size=128), "rtn"),
                                ("gptq-4bit-g128-act", QuantConfig(bits=4, group_size=128, desc_act=True), "gptq")):
        folder = tmp_path_factory.mktemp(name) / "q"
        quantize(smollm2_dir, folder, quant, CalibrationConfig(nsamples=32, seqlen=512), method,
                 device=torch.device("cuda"), tokens=tokens if method == "gptq" else None)
        out[name] = folder
    return out


def greedy(m, device: str) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, greedy continuation) per prompt, all prompts decoding as one batch."""
    if device == "cuda":
        assert all(q.backend == "triton" for q in m.model.modules() if isinstance(q, QuantLinear))
    engine = Engine(m.model, m.tokenizer, EngineConfig(max_batch=len(PROMPTS), max_seq_len=256))
    prompts = [m.tokenizer.encode(p, add_bos=True) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_new_tokens=NEW, ignore_eos=True)
    return prompts, [ids for _, ids, _ in engine.generate(prompts, params)]


@pytest.mark.parametrize("name", ["float", "rtn-4bit-g128", "gptq-4bit-g128-act"])
def test_greedy_tokens_match_the_reference_path(checkpoints, name):
    _, fast = greedy(load(str(checkpoints[name]), device="cuda", dtype="float16"), "cuda")
    ref_model = load(str(checkpoints[name]), device="cpu", dtype="float32")
    prompts, ref = greedy(ref_model, "cpu")
    for f, r, p, text in zip(fast, ref, prompts, PROMPTS):
        i = next((i for i, (a, b) in enumerate(zip(f, r)) if a != b), None)
        if i is None:
            continue
        with torch.no_grad():
            top = ref_model.model(torch.tensor([p + r[:i]]))[0, -1].topk(2)
        gap = float(top.values[0] - top.values[1])
        assert f[i] == int(top.indices[1]) and gap < TIE, (
            f"{name}: {text!r} leaves the reference at token {i} of {NEW} (float32 top-2 gap {gap:.4f})")
