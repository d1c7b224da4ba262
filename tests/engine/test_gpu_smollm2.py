"""The trained SmolLM2 on the GPU fast path (marked gpu and slow): greedy decoding gives the tokens of the
torch reference path (the same weights on the CPU in float32), for the float model and for 4-bit GPTQ
checkpoints made here (round-to-nearest g128, and GPTQ with act-order, calibrated on prose)."""

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


def greedy(model_dir, device, dtype) -> list[list[int]]:
    m = load(str(model_dir), device=device, dtype=dtype)
    if device == "cuda":
        assert all(q.backend == "triton" for q in m.model.modules() if isinstance(q, QuantLinear))
    engine = Engine(m.model, m.tokenizer, EngineConfig(max_batch=len(PROMPTS), max_seq_len=256))
    prompts = [m.tokenizer.encode(p, add_bos=True) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_new_tokens=NEW, ignore_eos=True)
    return [ids for _, ids, _ in engine.generate(prompts, params)]


@pytest.mark.parametrize("name", ["float", "rtn-4bit-g128", "gptq-4bit-g128-act"])
def test_greedy_tokens_match_the_reference_path(checkpoints, name):
    fast = greedy(checkpoints[name], "cuda", "float16")
    ref = greedy(checkpoints[name], "cpu", "float32")
    for f, r, prompt in zip(fast, ref, PROMPTS):
        same = next((i for i, (a, b) in enumerate(zip(f, r)) if a != b), len(f))
        assert f == r, f"{name}: {prompt!r} diverges at token {same} of {NEW}"
