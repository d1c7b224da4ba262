"""The `lowbit` command: generate, chat, info, convert-gguf.

The only module that configures logging, reads the environment and picks devices. Sampling flags are
derived from the `SamplingParams` dataclass. Every `LowbitError` becomes one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from lowbit.errors import LowbitError

log = logging.getLogger("lowbit")

SAMPLING_HELP = {
    "temperature": "softmax temperature; 0 = greedy",
    "top_k": "keep the k most likely tokens (0 = off)",
    "top_p": "nucleus sampling: keep the smallest set with this probability mass",
    "min_p": "drop tokens below min_p x the top probability",
    "typical_p": "locally typical sampling mass (1 = off)",
    "repetition_penalty": "HF/CTRL penalty on tokens seen in prompt or output (1 = off)",
    "presence_penalty": "OpenAI presence penalty on generated tokens",
    "frequency_penalty": "OpenAI frequency penalty on generated tokens",
    "seed": "random seed for reproducible sampling",
    "max_new_tokens": "most tokens to generate",
    "stop": "stop when this string appears (repeatable)",
}
# The seeds' model cards sample with temperature 0.7, top_p 0.95, top_k 40.
SAMPLING_DEFAULTS = {"temperature": 0.7, "top_p": 0.95, "top_k": 40}


def cache_dir() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    from lowbit.engine.sampling import SamplingParams

    group = parser.add_argument_group("sampling")
    for f in dataclasses.fields(SamplingParams):
        if f.name not in SAMPLING_HELP:
            continue
        default = SAMPLING_DEFAULTS.get(f.name, f.default)
        flag = "--" + f.name.replace("_", "-")
        if f.name == "stop":
            group.add_argument(flag, action="append", default=[], help=SAMPLING_HELP[f.name])
            continue
        kind = int if f.name in ("top_k", "seed", "max_new_tokens") else float
        group.add_argument(flag, type=kind, default=default, help=f"{SAMPLING_HELP[f.name]} (default: {default})")


def sampling_params(args: argparse.Namespace):
    from lowbit.engine.sampling import SamplingParams

    values = {k: getattr(args, k) for k in SAMPLING_HELP}
    values["stop"] = tuple(values["stop"])
    return SamplingParams(**values)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model folder, .safetensors/.gguf file, Hub id org/name[:branch], or 'smollm2'")
    group = parser.add_argument_group("loading")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when available)")
    group.add_argument("--dtype", default="auto", help="float32, float16, bfloat16 (default: float16 on GPU, float32 on CPU)")
    group.add_argument("--allow-pickle", action="store_true", help="allow loading .bin/.pt pickle weights (can run code)")


def load_from_args(args: argparse.Namespace):
    from lowbit.api import load

    return load(args.model, args.device, args.dtype, args.allow_pickle, cache_dir(), progress=_progress())


def _progress() -> bool:
    return sys.stderr.isatty()


def _engine(loaded, args, max_seq_len: int):
    from lowbit.engine.engine import Engine, EngineConfig

    return Engine(loaded.model, loaded.tokenizer, EngineConfig(max_batch=1, max_seq_len=max_seq_len))


def _named_template(args: argparse.Namespace):
    """Check a --template name before the (slow) model load."""
    from lowbit.chat import template

    return template.get(args.template) if args.template else None


def cmd_generate(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    named = _named_template(args)
    loaded = load_from_args(args)
    if args.no_template:
        ids = loaded.tokenizer.encode(args.prompt, add_bos=True)
    else:
        template = named or loaded.chat_template()
        params = dataclasses.replace(params, stop=params.stop + template.stop)
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}]
        text = template.render(messages, add_generation_prompt=True, **loaded.tokenizer.special_tokens)
        ids = loaded.tokenizer.encode(text, add_bos=False)
    engine = _engine(loaded, args, len(ids) + params.max_new_tokens)
    for out in engine.stream(ids, params):
        sys.stdout.write(out.delta_text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


CHAT_HELP = "commands: /reset clears the conversation, /system TEXT sets the system prompt, /exit quits"


def cmd_chat(args: argparse.Namespace) -> int:
    from lowbit.chat.session import ChatSession

    params = sampling_params(args)
    named = _named_template(args)
    loaded = load_from_args(args)
    template = named or loaded.chat_template()
    engine = _engine(loaded, args, args.max_seq_len)
    session = ChatSession(engine, template, params, args.system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"lowbit chat: {loaded.folder.name} (template: {template.name}). {CHAT_HELP}", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 0
        if not _chat_line(session, line.strip()):
            return 0


def _chat_line(session, line: str) -> bool:
    """Handle one line of the REPL; False means quit."""
    if not line:
        return True
    if line in ("/exit", "/quit"):
        return False
    if line == "/reset":
        session.reset()
        print("(conversation cleared)", file=sys.stderr)
    elif line.startswith("/system"):
        session.set_system(line[len("/system"):].strip())
        session.reset()
        print("(system prompt set; conversation cleared)", file=sys.stderr)
    elif line.startswith("/"):
        print(f"unknown command {line.split()[0]}; {CHAT_HELP}", file=sys.stderr)
    else:
        try:
            for delta in session.send(line):
                sys.stdout.write(delta)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass  # stop this reply, keep the conversation
        sys.stdout.write("\n")
        sys.stdout.flush()
    return True


def cmd_info(args: argparse.Namespace) -> int:
    from lowbit.api import model_folder
    from lowbit.model.info import describe

    print(describe(model_folder(args.model, cache_dir(), _progress()), args.allow_pickle))
    return 0


def cmd_convert_gguf(args: argparse.Namespace) -> int:
    from lowbit.api import DTYPES
    from lowbit.model.gguf import convert_gguf

    if args.dtype not in DTYPES:
        raise LowbitError(f"unknown dtype {args.dtype!r}; choose {', '.join(DTYPES)}")
    out = convert_gguf(Path(args.gguf), Path(args.out_dir), DTYPES[args.dtype], args.overwrite, _progress())
    print(out)
    return 0


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
    desc_act = base.desc_act if args.desc_act is None else args.desc_act
    static = (base.static_groups and desc_act) if args.static_groups is None else args.static_groups
    return QuantConfig(bits=bits, group_size=group_size, desc_act=desc_act,
                       sym=base.sym if args.sym is None else args.sym, static_groups=static,
                       true_sequential=not args.no_true_sequential, damp_percent=args.damp,
                       checkpoint_format=args.format)


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
    source = model_folder(args.model, cache_dir(), _progress())
    mse = quant_defaults(args)[1] if args.mse is None else args.mse
    kwargs = dict(method=args.method, mse=mse, device=pick_device(args.device), resume=args.resume,
                  overwrite=args.overwrite, progress=_progress(), lora=lora)
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

    base = model_folder(args.base, cache_dir(), _progress())
    delta = model_folder(args.delta, cache_dir(), _progress())
    report = apply_delta(base, delta, Path(args.out_dir), args.overwrite, args.allow_pickle, progress=_progress())
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
    result = perplexity(loaded.model, tokens, seqlen=args.seqlen, progress=_progress())
    if args.json:
        print(json.dumps({"model": args.model, "dataset": args.dataset, "seqlen": args.seqlen,
                          "perplexity": result.ppl, "nll": result.nll, "windows": result.windows,
                          "tokens": result.tokens}))
    else:
        print(f"perplexity {result.ppl:.4f} ({result.windows} windows of {args.seqlen} tokens, "
              f"{result.tokens} tokens, dataset {args.dataset})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lowbit import demo

    settings = demo.DemoSettings(nsamples=args.nsamples, eval_windows=args.eval_windows, dataset=args.dataset)
    demo.run(settings, cache_dir(), args.device, args.overwrite, progress=_progress())
    return 0


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="the whole path on the built-in SmolLM2: import, quantize, perplexity, chat",
                       description="Import SmolLM2-135M-Instruct, quantize it to 4-bit GPTQ, compare float and "
                                   "quantized perplexity and size, and answer one chat turn with the 4-bit model.")
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows of 512 tokens (default 16)")
    p.add_argument("--eval-windows", type=int, default=24, help="perplexity windows of 512 tokens (default 24)")
    p.add_argument("--dataset", help="text for calibration and evaluation (default: the Python docs split)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="quantize again even if the demo checkpoint exists")
    p.set_defaults(func=cmd_demo)


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


def add_serve_parser(sub) -> None:
    from lowbit.config import ServerConfig

    p = sub.add_parser("serve", help="OpenAI-compatible API (/v1/chat/completions, /v1/completions) and a chat page at /",
                       description="Serve MODEL over HTTP with continuous batching; open http://HOST:PORT/ to chat.")
    add_model_args(p)
    p.add_argument("--template", help="a named fallback template instead of the model's own")
    g = p.add_argument_group("http")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    for f in dataclasses.fields(ServerConfig):  # default None: cmd_serve fills in model- and env-based defaults
        kind = int if f.type == "int" else str
        g.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None, help=f.metadata["help"])
    g = p.add_argument_group("engine")
    g.add_argument("--max-batch", type=int, default=8, help="requests decoded together (KV cache slots; default 8)")
    g.add_argument("--max-model-len", type=int, default=2048, help="prompt + reply tokens per request (default 2048)")
    g.add_argument("--max-waiting", type=int, default=256, help="queued requests beyond this get 429 (default 256)")
    g.add_argument("--max-wait", type=float, default=60.0, help="seconds a request may wait for a slot before a 503")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from lowbit.server.app import create_app
    except ImportError as e:
        raise LowbitError(f"lowbit serve needs the serve extra ({e.name} is missing): pip install 'lowbit[serve]'") from None
    from lowbit.config import ServerConfig
    from lowbit.engine.engine import Engine, EngineConfig

    if args.max_batch < 1 or args.max_model_len < 2 or args.max_waiting < 0 or args.max_wait <= 0:
        raise LowbitError("--max-batch must be >= 1, --max-model-len >= 2, --max-waiting >= 0 and --max-wait > 0")
    _check_port_free(args.host, args.port)
    named = _named_template(args)
    defaults = ServerConfig(model_name=Path(args.model).name if Path(args.model).exists() else args.model,
                            api_key=os.environ.get("LOWBIT_API_KEY") or None)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig) if getattr(args, f.name) is not None}
    config = dataclasses.replace(defaults, **given)
    loaded = load_from_args(args)
    engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(
        max_batch=args.max_batch, max_seq_len=args.max_model_len, max_waiting=args.max_waiting, max_wait_s=args.max_wait))
    app = create_app(engine, loaded.tokenizer, named or loaded.chat_template(), config)
    logging.getLogger("lowbit.server").setLevel(logging.INFO)
    print(f"lowbit: serving {config.model_name} on http://{args.host}:{args.port}/ (max batch {args.max_batch}, "
          f"context {engine.max_seq_len}, KV cache {engine.cache.nbytes / 2**20:.0f} MiB)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=5)
    return 0


def _check_port_free(host: str, port: int) -> None:
    """Fail in one line before the (slow) model load when the address cannot be listened on."""
    import socket

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except (OSError, OverflowError) as e:
        raise LowbitError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None


def add_bench_parser(sub) -> None:
    from lowbit.eval.bench import BenchConfig

    d = BenchConfig()
    p = sub.add_parser("bench", help="GPU decode/prefill speed, TTFT, memory and weight bandwidth, as one table",
                       description="Benchmark MODEL, or random models of --shape in several weight formats side by side.")
    p.add_argument("model", nargs="?", help="model folder/file/Hub id/'smollm2' (omit with --shape)")
    p.add_argument("--shape", help="random weights of a named shape: llama-7b, llama-13b, llama-65b, llama-2-70b")
    p.add_argument("--variants", default="fp16,gptq-4bit-g128,gptq-4bit-g128-act,gptq-8bit-g128,gptq-3bit-g128,"
                   "torch-int4-tinygemm", help="with --shape: comma-separated weight formats to compare")
    p.add_argument("--batches", default=",".join(map(str, d.batches)), help="decode batch sizes (default 1,4,16,64)")
    p.add_argument("--prompt-len", type=int, default=d.prompt_len, help="prompt tokens per decode request")
    p.add_argument("--new-tokens", type=int, default=d.new_tokens, help="tokens generated per request")
    p.add_argument("--prefill-len", type=int, default=d.prefill_len, help="prompt length of the prefill measurement")
    p.add_argument("--context", type=int, help="KV cache length per request (default prompt + new tokens)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly")
    p.add_argument("--dtype", default="float16", help="with MODEL: float16 (default) or bfloat16")
    p.add_argument("--out", help="also write the table (with command, date and device) to this markdown file")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    import datetime

    import torch

    from lowbit.eval import bench

    if not torch.cuda.is_available():
        raise LowbitError("lowbit bench measures GPU inference and needs a CUDA GPU")
    if bool(args.model) == bool(args.shape):
        raise LowbitError("give a MODEL or --shape (one of them)")
    try:
        batches = tuple(int(b) for b in args.batches.split(","))
    except ValueError:
        raise LowbitError(f"--batches must be integers separated by commas, got {args.batches!r}") from None
    config = bench.BenchConfig(batches, args.prompt_len, args.new_tokens, args.prefill_len, args.context,
                               cuda_graphs=not args.no_cuda_graphs)
    device = torch.device("cuda")
    copy = bench.copy_bandwidth(device)
    if args.shape:
        done: list = []

        def report(row) -> None:  # the table so far, in case a long run is cut short
            done.append(row)
            log.info("so far:\n%s", bench.table(done, config, copy))

        rows = bench.bench_shape(args.shape, args.variants.split(","), config, device, report=report)
    else:
        from lowbit.api import load

        loaded = load(args.model, "cuda", args.dtype, cache=cache_dir(), progress=_progress())
        rows = [bench.bench_model(args.model, loaded.model, loaded.tokenizer, config)]
    import triton

    what = f"--shape {args.shape}" if args.shape else args.model
    header = (f"lowbit bench {what}: batches {args.batches}, prompt {args.prompt_len}, new tokens {args.new_tokens}, "
              f"prefill {args.prefill_len}, context {args.context or args.prompt_len + args.new_tokens}, "
              f"cuda graphs {not args.no_cuda_graphs}. {datetime.date.today()}, {torch.cuda.get_device_name(device)}, "
              f"torch {torch.__version__}, triton {triton.__version__}; copy bandwidth {copy:.0f} GB/s (read + write)\n")
    text = header + "\n" + bench.table(rows, config, copy)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description="Quantize LLaMA-family models with GPTQ and run them.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="complete one prompt and print only the completion")
    add_model_args(p)
    p.add_argument("prompt", help="the prompt (wrapped in the chat template unless --no-template)")
    p.add_argument("--no-template", action="store_true", help="feed the prompt raw, without a chat template")
    p.add_argument("--template", help="a named fallback template instead of the model's own (vicuna_v1.1, "
                                      "guanaco, llama-2-chat, alpaca, chatml)")
    p.add_argument("--system", help="system prompt")
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat with streaming", description=CHAT_HELP)
    add_model_args(p)
    p.add_argument("--template", help="a named fallback template instead of the model's own")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-seq-len", type=int, default=2048, help="context window used for the conversation")
    add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="architecture, parameters, quantization and memory of a model")
    p.add_argument("model", help="model folder, file, Hub id or built-in name")
    p.add_argument("--allow-pickle", action="store_true", help="read .bin/.pt pickle weights")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert-gguf", help="import a llama.cpp GGUF file as an HF float checkpoint folder")
    p.add_argument("gguf", help="the .gguf file")
    p.add_argument("out_dir", help="the folder to write (must not exist unless --overwrite)")
    p.add_argument("--dtype", default="float32", help="float32 (default), float16 or bfloat16")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(func=cmd_convert_gguf)
    add_quantize_parser(sub)
    add_apply_delta_parser(sub)
    add_eval_parser(sub)
    add_demo_parser(sub)
    add_serve_parser(sub)
    add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        _quiet_libraries()
    try:
        return args.func(args)
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


if __name__ == "__main__":
    sys.exit(main())
