"""The peer, side by side: GPTQModel 7.7 quantizes SmolLM2 on lowbit's own calibration windows, lowbit evaluates.

Run in a separate environment that has gptqmodel 7.7 (never the project's), with lowbit's `src` on the path:

    python -m venv /tmp/peer-venv --system-site-packages
    pip download --no-deps "gptqmodel==7.7.*"            # an sdist; its pyproject needs a recent setuptools,
    tar xzf gptqmodel-7.7.0.tar.gz                       # so put the source on the path instead of building it:
    echo $PWD/gptqmodel-7.7.0 > /tmp/peer-venv/lib/python3.11/site-packages/gptqmodel-src.pth
    /tmp/peer-venv/bin/pip install --no-deps pypcre logbar accelerate threadpoolctl device-smi tokenicer \
        defuser pillow                                   # what `import gptqmodel` needs beyond torch/transformers
    cd /tmp/peer-run && GPTQMODEL_CPU_WORKERS=2 PYTHONPATH=$REPO/src /tmp/peer-venv/bin/python \
        $REPO/benchmarks/peer_gptqmodel.py --model FLOAT_FOLDER --work /tmp/peer-out --settings 4bit,4bit-act,3bit \
        --out $OUT/peer.md

(GPTQModel writes a logs/ folder into the working directory, hence the cd; GPTQMODEL_CPU_WORKERS=2 because
its CPU thread pool asks for 2 workers and defaults to cores/2, which is 1 on a 2-core machine.)

Each setting: GPTQModel.load(float folder, QuantizeConfig(...)) -> quantize(the 128 x 512 windows of
`lowbit.data.python_docs_split` + `calibration_windows`, seed 0, given as input_ids so both tools see the
same tokens) -> save(folder); then `lowbit.load_model` reads the peer's folder and `lowbit.eval.perplexity`
measures it on reference/ (199 windows of 512, float32), exactly as benchmarks/quality.py measures lowbit.
Settings: sym, damp 0.01, true-sequential, group size 128, and the peer's default act_group_aware (GAR) on
unless act-order. On CPU the model is loaded in float32 (lowbit's CPU calibration dtype); `--dtype auto`
leaves the peer's choice (float16/bfloat16 on a GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lowbit.data import DOCS_ROOT, calibration_windows, eval_tokens, python_docs_split
from lowbit.eval.perplexity import perplexity
from lowbit.model.tokenizer import Tokenizer
from lowbit.model.weights import load_model

SETTINGS = {  # name -> QuantizeConfig overrides on top of the shared ones
    "4bit": {"bits": 4},  # the peer's default: act_group_aware (GAR) on
    "4bit-nogar": {"bits": 4, "act_group_aware": False},
    "4bit-act": {"bits": 4, "desc_act": True, "act_group_aware": False},
    "3bit": {"bits": 3},
    "3bit-act": {"bits": 3, "desc_act": True, "act_group_aware": False},
}
SHARED = {"group_size": 128, "sym": True, "damp_percent": 0.01, "true_sequential": True}


def quantize_with_peer(model: Path, out: Path, overrides: dict, tokens: torch.Tensor, device: str,
                       dtype: str) -> float:
    """GPTQModel load -> quantize -> save; returns the seconds it took."""
    from gptqmodel import GPTQModel, QuantizeConfig

    cfg = QuantizeConfig(**SHARED, **overrides)
    kwargs = {} if dtype == "auto" else {"dtype": getattr(torch, dtype)}
    t0 = time.perf_counter()
    peer = GPTQModel.load(str(model), cfg, device=device, **kwargs)
    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in tokens]
    peer.quantize(calibration, batch_size=1)
    peer.save(str(out))
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="SmolLM2-135M-Instruct float folder")
    ap.add_argument("--work", type=Path, required=True, help="where the peer's folders are written")
    ap.add_argument("--settings", default="4bit,4bit-act,3bit", help=f"comma-separated: {', '.join(SETTINGS)}")
    ap.add_argument("--docs", type=Path, default=DOCS_ROOT)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 | auto (default: float32 on "
                    "CPU, auto on a GPU)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-windows", type=int, default=None, help="evaluate only the first windows (smoke runs)")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = ap.parse_args()
    names = [s.strip() for s in args.settings.split(",")]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        print(f"peer_gptqmodel: unknown setting(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    dtype = args.dtype or ("float32" if args.device == "cpu" else "auto")

    tok = Tokenizer.from_pretrained(args.model)
    calib_texts, eval_texts = python_docs_split(args.docs)
    tokens = calibration_windows(tok, calib_texts, args.nsamples, args.seqlen, args.seed)
    ref = eval_tokens(tok, eval_texts)
    import gptqmodel

    title = (f"# GPTQModel {gptqmodel.__version__} on lowbit's calibration windows; lowbit evaluates "
             f"({args.device}, quantize dtype {dtype}, torch {torch.__version__})")
    lines = [title, "",
             f"calibration {tuple(tokens.shape)} seed {args.seed}; shared settings {json.dumps(SHARED)}", "",
             "| setting | overrides | peer quantize s | ppl (reference) | g_idx monotonic |", "|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name in names:
        out = args.work / name
        seconds = quantize_with_peer(args.model, out, SETTINGS[name], tokens, args.device, dtype)
        model, ckpt = load_model(out, torch.device("cpu"), torch.float32)
        g_idx = ckpt.tensors.get(ckpt.hf_name(0, "self_attn.q_proj") + ".g_idx")
        monotonic = bool((g_idx[1:] >= g_idx[:-1]).all())
        with torch.no_grad():
            ppl = perplexity(model, ref, seqlen=args.seqlen, batch_size=8, max_windows=args.max_windows).ppl
        lines.append(f"| {name} | {json.dumps(SETTINGS[name])} | {seconds:.0f} | {ppl:.4f} | {monotonic} |")
        print(lines[-1], flush=True)
        del model
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
