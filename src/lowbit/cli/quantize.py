"""`lowbit quantize`, `apply-delta` and `eval ppl`: making and measuring checkpoints. Unset quantization
flags fall back to lowbit's recommended recipe (`quant_defaults`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lowbit.cli.common import add_model_args, cache_dir, load_from_args, show_progress
from lowbit.errors import LowbitError


def quant_defaults(args: argparse.Namespace) -> tuple:
    """(QuantConfig, mse) that unset flags fall back to: lowbit's recommended recipe for a single GPTQ run
    (act-order with static groups, asymmetric, clipping search: see BENCHMARKS.md), the seeds' settings for
    --variants (the Hub's branch names promise them) and plain round-to-nearest for --method rtn."""
    from lowbit.config import RECOMMENDED_MSE, RECOMMENDED_QUANT, QuantConfig

    if args.method == "gptq" and args.variants is None:
        return RECOMMENDED_QUANT, RECOMMENDED_MSE
    return QuantConfig(), False


def quant_config(args: argparse.Namespace):
    from lowbit.config import QuantConfig

    base, _ = quant_defaults(args)
    bits = 4 if args.bits is None else args.bits
    group_size = 128 if args.group_size is None else args.group_size
    gar = args.act_group_aware
    desc_act = (base.desc_act and not gar) if args.desc_act is None else args.desc_act  # GAR asked: no act-order
    static = (base.static_groups and desc_act) if args.static_groups is None else args.static_groups
    return QuantConfig(bits=bits, group_size=group_size, desc_act=desc_act,
                       sym=base.sym if args.sym is None else args.sym, static_groups=static,
                       true_sequential=not args.no_true_sequential, damp_percent=args.damp,
                       checkpoint_format=args.format, act_group_aware=gar)


def calibration_config(args: argparse.Namespace):
    from lowbit.config import CalibrationConfig

    return CalibrationConfig(dataset=args.dataset, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)


def cmd_quantize(args: argparse.Namespace) -> int:
    from lowbit.api import model_folder, pick_device
    from lowbit.quant.variants import parse_variants

    specs = parse_variants(args.variants) if args.variants is not None else None
    if specs is not None and (args.bits is not None or args.group_size is not None or args.desc_act is not None):
        raise LowbitError("--variants sets bits, group size and act-order per variant; drop --bits, "
                          "--group-size and --desc-act")
    quant, calib = quant_config(args), calibration_config(args)
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not args.overwrite:
        raise LowbitError(f"{out_dir} already exists; pass --overwrite to replace it")
    lora = Path(args.lora) if args.lora else None
    if lora is not None and not lora.is_dir():
        raise LowbitError(f"{lora}: no such adapter folder (expected adapter_config.json + adapter_model.safetensors)")
    source = model_folder(args.model, cache_dir(), show_progress())
    mse = quant_defaults(args)[1] if args.mse is None else args.mse
    kwargs = {"method": args.method, "mse": mse, "device": pick_device(args.device), "resume": args.resume,
                  "overwrite": args.overwrite, "progress": show_progress(), "lora": lora}
    try:
        return _run_quantize(source, out_dir, specs, quant, calib, kwargs)
    except KeyboardInterrupt:
        print(f"lowbit: interrupted; finished layers are kept beside {out_dir}: run the same command with "
              "--resume to continue", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, a lost mount: the run's own files, never the model's
        where = f" ({e.filename})" if e.filename else ""
        raise LowbitError(f"quantization stopped: {e.strerror or e}{where}; {source} is untouched and finished "
                          "layers are kept: fix the cause and run the same command with --resume") from None


def _run_quantize(source: Path, out_dir: Path, specs, quant, calib, kwargs: dict) -> int:
    from lowbit.quant.job import quantize
    from lowbit.quant.variants import quantize_variants

    if specs is None:
        _print_quantized(quantize(source, out_dir, quant, calib, **kwargs))
        return 0
    result = quantize_variants(source, out_dir, specs, quant, calib, **kwargs)
    for branch, report in result.reports.items():
        if report is None:
            print(f"{branch}: finished by the interrupted run")
        else:
            _print_quantized(report, f"{branch}: ")
    print(f"wrote {out_dir}: {len(result.variants)} variants, model card {out_dir / 'README.md'}")
    return 0


def _print_quantized(report, prefix: str = "") -> None:
    q = report.quant
    print(f"{prefix}wrote {report.out_dir}: {q.bits}-bit group {q.group_size} desc_act={q.desc_act} sym={q.sym} "
          f"format={q.checkpoint_format}, {report.size_bytes / 1024**2:.1f} MiB, {report.seconds:.1f} s"
          + (f", peak GPU {report.peak_gpu_bytes / 1024**3:.2f} GiB" if report.peak_gpu_bytes else ""))


def cmd_apply_delta(args: argparse.Namespace) -> int:
    from lowbit.api import model_folder
    from lowbit.model.delta import apply_delta

    base = model_folder(args.base, cache_dir(), show_progress())
    delta = model_folder(args.delta, cache_dir(), show_progress())
    report = apply_delta(base, delta, Path(args.out_dir), args.overwrite, args.allow_pickle, progress=show_progress())
    grown = f"; rows added to {', '.join(report.grown)}" if report.grown else ""
    print(f"wrote {report.out_dir}: {report.tensors} tensors{grown}")
    return 0


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    import json

    from lowbit.data import eval_tokens, load_texts
    from lowbit.eval.perplexity import perplexity

    loaded = load_from_args(args)
    texts = load_texts(args.dataset, args.split, loaded.tokenizer)
    tokens = eval_tokens(loaded.tokenizer, texts)
    result = perplexity(loaded.model, tokens, seqlen=args.seqlen, progress=show_progress())
    if args.json:
        print(json.dumps({"model": args.model, "dataset": args.dataset, "seqlen": args.seqlen,
                          "perplexity": result.ppl, "nll": result.nll, "windows": result.windows,
                          "tokens": result.tokens}))
    else:
        print(f"perplexity {result.ppl:.4f} ({result.windows} windows of {args.seqlen} tokens, "
              f"{result.tokens} tokens, dataset {args.dataset})")
    return 0


def add_quantize_parser(sub) -> None:
    p = sub.add_parser("quantize", help="GPTQ-quantize a float model into a checkpoint every GPTQ loader reads",
                       description="Quantize MODEL layer by layer with GPTQ (or round-to-nearest) and write OUT_DIR. "
                                   "Unset flags give lowbit's recommended 4-bit recipe: group size 128, "
                                   "act-order with static groups, asymmetric, clipping search (--variants and "
                                   "--method rtn default to the seeds' plain settings: symmetric, no search).")
    p.add_argument("model", help="float model: folder, .gguf, Hub id or 'smollm2'")
    p.add_argument("out_dir", help="output folder (written atomically; must not exist unless --overwrite)")
    g = p.add_argument_group("quantization")
    g.add_argument("--bits", type=int, default=None, help="bits per weight: 2, 3, 4 or 8 (default 4)")
    g.add_argument("--group-size", type=int, default=None,
                   help="columns per scale/zero group; -1 = one group per row (default 128)")
    on_off = argparse.BooleanOptionalAction
    g.add_argument("--desc-act", action=on_off, default=None,
                   help="act-order: quantize columns by decreasing Hessian diagonal (default on)")
    g.add_argument("--act-group-aware", action=on_off, default=None,
                   help="GAR: without act-order, quantize whole groups in order of their largest Hessian diagonal "
                        "and each group's columns by theirs; the file stays plain non-act-order GPTQ (default on "
                        "without --desc-act, as GPTQModel; asking for it turns the default act-order off; "
                        "act-order variants ignore it)")
    g.add_argument("--static-groups", action=on_off, default=None,
                   help="fix groups before act-order, so g_idx stays monotonic (default on with act-order)")
    g.add_argument("--sym", action=on_off, default=None,
                   help="symmetric grid; --no-sym = a zero point per group (default asymmetric)")
    g.add_argument("--damp", type=float, default=0.01, help="Hessian dampening, fraction of mean(diag H) (default 0.01)")
    g.add_argument("--no-true-sequential", action="store_true", help="quantize a layer's linears from one pass")
    g.add_argument("--method", default="gptq", help="gptq (default) or rtn round-to-nearest")
    g.add_argument("--mse", action=on_off, default=None,
                   help="search a clipping range for each group's scale (default on)")
    g.add_argument("--format", default="gptq",
                   help="checkpoint_format: gptq (v1, read everywhere) or gptq_v2")
    g.add_argument("--variants", metavar="LIST",
                   help="several quantizations in one go, one folder each, named like the Hub's branches: "
                        "comma-separated BITSbit-GROUPg[-actorder] names, e.g. 4bit-128g,4bit-32g-actorder,"
                        "8bit--1g-actorder (other flags apply to all)")
    g.add_argument("--lora", metavar="ADAPTER_DIR",
                   help="merge this PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) into the "
                        "float weights before quantizing")
    g = p.add_argument_group("calibration")
    g.add_argument("--dataset", default="wikitext2", help="wikitext2, c4, or a local .txt/.jsonl/.parquet file or folder")
    g.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    g.add_argument("--seqlen", type=int, default=2048, help="tokens per window, capped at the context (default 2048)")
    g.add_argument("--seed", type=int, default=0, help="window sampling seed")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (default: cuda when available)")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run with the same settings")
    g.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(func=cmd_quantize)


def add_apply_delta_parser(sub) -> None:
    p = sub.add_parser("apply-delta", help="rebuild a model released as delta weights: OUT = BASE + DELTA",
                       description="Add DELTA's tensors to BASE's (Vicuna v0 style delta weights, as FastChat's "
                                   "apply_delta does) and write OUT_DIR with the delta's config and tokenizer.")
    p.add_argument("base", help="the base float model (e.g. LLaMA): folder, Hub id")
    p.add_argument("delta", help="the delta weights: folder, Hub id")
    p.add_argument("out_dir", help="the folder to write (atomically; must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--allow-pickle", action="store_true", help="read .bin pickle weights (can run code)")
    p.set_defaults(func=cmd_apply_delta)


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="measure model quality")
    esub = p.add_subparsers(dest="metric", required=True, metavar="METRIC")
    p = esub.add_parser("ppl", help="perplexity with the GPTQ-paper protocol (non-overlapping windows)")
    add_model_args(p)
    p.add_argument("--dataset", default="wikitext2", help="wikitext2, c4, or a local .txt/.jsonl/.parquet file or folder")
    p.add_argument("--split", default="test", help="dataset split for wikitext2/c4 (default test)")
    p.add_argument("--seqlen", type=int, default=2048, help="window length (default 2048)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval_ppl)
