"""Offline sm_90 compile of the M=1 GEMV (`gemv._gemv_kernel`) in its modes, with no GPU: Triton's bundled
ptxas and cuobjdump give each variant's registers, stack bytes (spills) and SASS instruction counts, so a
variant can be screened before device time is spent on it. 4-bit g128, adding into float32 (as one-row
decode runs it), PDL on. --mma: the mma layout's kernel (`mma._mma_kernel`) instead, at 1, 16 and 32 rows of x
(one-row decode adding into float32; 16 and 32 with the split-K finish), in the tiles the benchmarks sweep.
--dot: the slots layout's tensor-core kernel (`dot._dot_kernel`), with and without the weight as the dot's first
operand (SWAP), at 16, 64 and 128 rows of x. --mma-dot: the mma layout's tile kernel (`mma_dot._mma_dot_kernel`,
and `_x_first_kernel`). "wgmma waits": the waits for wgmma in the SASS (a kernel that waits after each K=16 dot
serializes its tensor cores with its own unpacking).

Run from the repository root (any machine with triton):
    PYTHONPATH=src python benchmarks/gemv_sass.py [--mma | --dot | --mma-dot] [--dump DIR]
(--dump: each variant's SASS to DIR). The counts are of the local Triton's compiler, which may differ from the
GPU machine's version; compare variants with each other, not with a profile taken there. To compile with the
GPU machine's Triton instead (3.6 there), install that version beside the local one and put it first:
    pip download --no-deps triton==3.6.0 -d /tmp/t36 && pip install --no-deps --target /tmp/t36/site /tmp/t36/*.whl
    PYTHONPATH=/tmp/t36/site:src TRITON_CACHE_DIR=/tmp/t36/cache python benchmarks/gemv_sass.py --mma-dot
"""

from __future__ import annotations

import argparse
import collections
import inspect
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lowbit.kernels import dot, gemv, mma, mma_dot

POINTERS = {"x_ptr": "*fp16", "qw_ptr": "*i32", "qh_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8", "perm_ptr": "*i32",
            "b_ptr": "*fp16", "ws_ptr": "*fp32", "lock_ptr": "*i32", "y_ptr": "*fp32", "pos_ptr": "*i32",
            "xs_ptr": "*fp32"}
DEFAULTS = dict(BITS=4, FIELDS=8, GROUP_SLOTS=8, HAS_PERM=False, HAS_BIAS=False, BN=64, SP=8, FENCE=True, SUB=True,
                EVEN_N=True, EVEN_K=True, UNROLL=2, PREFETCH=False, SWIGLU=False, HAS_POS=False, ADD=True, XSW=0,
                XONCE=False, PDL=True)
DIVISIBLE = ("N", "K", "num_blocks")  # 7B shapes: Triton's launcher marks integers divisible by 16 (vector loads)
VARIANTS = [  # (name, constexpr overrides, num_warps)
    ("default (BN 64, unroll 2)", {}, 4),
    ("unroll 1", {"UNROLL": 1}, 4),
    ("unroll 1, prefetch", {"UNROLL": 1, "PREFETCH": True}, 4),
    ("unroll 2, prefetch", {"PREFETCH": True}, 4),
    ("BN 32, 2 warps", {"BN": 32}, 2),
    ("SwiGLU on load (down_proj)", {"XSW": 1}, 4),
    ("SwiGLU once into a scratch row", {"XSW": 1, "XONCE": True}, 4),
    ("SwiGLU once, unroll 1, prefetch", {"XSW": 1, "XONCE": True, "UNROLL": 1, "PREFETCH": True}, 4),
]
MMA_POINTERS = {"x_ptr": "*i32", "qw_ptr": "*i32", "s_ptr": "*i32", "z_ptr": "*i16", "b_ptr": "*fp16",
                "ws_ptr": "*fp32", "lock_ptr": "*i32", "y_ptr": "*fp32", "pos_ptr": "*i32", "xf_ptr": "*fp32",
                "xh_ptr": "*fp16"}
MMA_DEFAULTS = dict(CT=4, SPR=2, NT=1, HAS_BIAS=False, SP=8, FENCE=True, SWIGLU=False, HAS_POS=False, STAGES=1,
                    PREFETCH=0, EMULATE=False, ADD=1, AHEAD=2, XSW=0, XMG=0, XMG_DIM=0,
                    XMG_STRIDE=0, XMG_N=0, PDL=True)
MMA_DIVISIBLE = ("N", "stride_xm", "slabs")
MMA_VARIANTS = [  # (name, constexpr overrides, num_warps); NT: x row tiles of 8 (M = 8 * NT at most)
    *[(f"M=1, CT {ct}, ahead {ah}{', lanes' if add == 2 else ''}", {"CT": ct, "AHEAD": ah, "ADD": add}, 4)
      for ct in (4, 8) for ah in (2, 3) for add in (1, 2)],
    ("M=1, CT 4, ahead 2, lanes, SwiGLU input (down_proj)", {"ADD": 2, "XSW": 1}, 4),
    ("M=1, CT 4, ahead 2, lanes, attention merged on load (o_proj)",  # 7B at batch 1: 32 heads of 128, 9 splits
     {"ADD": 2, "XMG": 9, "XMG_DIM": 128, "XMG_STRIDE": 128, "XMG_N": 288}, 4),
    *[(f"M={8 * nt}, CT {ct}, {'ahead ' + str(ah) if ah else 'smem pipeline, 3 stages'}",
       {"NT": nt, "CT": ct, "AHEAD": ah, "STAGES": 1 if ah else 3, "PREFETCH": 0 if ah else 2, "ADD": 0,
        "y_ptr": "*fp16"}, 4)
      for nt in (2, 4) for ct in (4, 8) for ah in (0, 2, 3)],
]
DOT_POINTERS = {"x_ptr": "*fp16", "qw_ptr": "*i32", "qh_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8",
                "perm_ptr": "*i32", "b_ptr": "*fp16", "ws_ptr": "*fp32", "lock_ptr": "*i32", "y_ptr": "*fp16"}
DOT_DEFAULTS = dict(BITS=4, FIELDS=8, GROUP_SLOTS=8, HAS_PERM=False, HAS_BIAS=False, GROUP_M=8, SP=1, FENCE=True,
                    IEEE=False, SUB=True, PER_SLOT=True, SWAP=False, PDL=True)
DOT_VARIANTS = [  # (name, constexpr overrides, num_warps, num_stages); SP 4: split-K, as at 16 and 64 rows
    *[(f"BM {bm}, BN {bn}, {nw} warps{', swap' if swap else ''}", {"BM": bm, "BN": bn, "SP": 4, "SWAP": swap}, nw, st)
      for bm, bn, nw, st in ((16, 128, 2, 2), (16, 128, 4, 2), (16, 64, 4, 2), (64, 128, 4, 3), (64, 64, 4, 3),
                             (64, 128, 8, 3)) for swap in (False, True)],
    *[(f"BM 128, BN 128, 8 warps, {'per slot' if ps else 'per group'}{', swap' if swap else ''}",
       {"BM": 128, "BN": 128, "PER_SLOT": ps, "SWAP": swap}, 8, 3) for ps in (False, True) for swap in (False, True)],
    *[(f"BM 128, BN {bn}, 8 warps, per slot, swap, (q - z) * s in float16", {"BM": 128, "BN": bn, "PER_SLOT": True,
       "SWAP": True, "SUB": False}, 8, 3) for bn in (128, 256)],
]
MMA_DOT_POINTERS = {"x_ptr": "*fp16", "qw_ptr": "*i32", "s_ptr": "*i32", "z_ptr": "*i16", "b_ptr": "*fp16",
                    "ws_ptr": "*fp32", "lock_ptr": "*i32", "y_ptr": "*fp16"}
MMA_DOT_DEFAULTS = dict(SPR=2, GROUP_M=8, HAS_BIAS=False, SP=1, FENCE=True, PDL=True)
MMA_DOT_VARIANTS = [  # (name, constexpr overrides, num_warps, num_stages); SP 4: split-K
    (f"BM {bm}, CT {ct}, {nw} warps, {st} stages{', split-K' if sp > 1 else ''}", {"BM": bm, "CT": ct, "SP": sp}, nw,
     st) for bm, ct, nw, st, sp in ((16, 8, 4, 3, 4), (32, 8, 4, 3, 4), (64, 8, 4, 3, 4), (64, 8, 8, 3, 4),
                                    (64, 4, 4, 3, 4), (128, 8, 8, 3, 1), (128, 16, 8, 3, 1))
] + [  # x the dot's first operand (`mma_dot._x_first_kernel`, CH: slabs a dot)
    (f"x first, BM {bm}, CT {ct}, {nw} warps, {st} stages{', split-K' if sp > 1 else ''}",
     {"BM": bm, "CT": ct, "SP": sp, "CH": 2}, nw, st)
    for bm, ct, nw, st, sp in ((16, 8, 4, 3, 4), (64, 8, 8, 3, 4), (64, 4, 4, 3, 4), (64, 8, 4, 3, 4),
                                (128, 8, 8, 3, 1))
]
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_variant(overrides: dict, num_warps: int) -> bytes:
    params = list(inspect.signature(gemv._gemv_kernel.fn).parameters)
    const = {**DEFAULTS, **overrides}
    pointers = {**POINTERS, "x_ptr": "*fp32" if const["XSW"] else "*fp16"}
    signature = {p: "constexpr" if p in const else pointers.get(p, "i32") for p in params}
    source = ASTSource(gemv._gemv_kernel, signature, constexprs={(params.index(k),): v for k, v in const.items()},
                       attrs={(params.index(p),): [["tt.divisibility", 16]] for p in (*POINTERS, *DIVISIBLE)})
    options = {"num_warps": num_warps, "num_stages": 1, "launch_pdl": True}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["cubin"]


def compile_mma_variant(overrides: dict, num_warps: int) -> bytes:
    params = list(inspect.signature(mma._mma_kernel.fn).parameters)
    pointers = {**MMA_POINTERS, **{k: v for k, v in overrides.items() if k.endswith("_ptr")}}
    const = {**MMA_DEFAULTS, **{k: v for k, v in overrides.items() if not k.endswith("_ptr")}}
    const["ASM"], const["CONSTRAINTS"] = mma.mma_asm(const["NT"])
    signature = {p: "constexpr" if p in const else pointers.get(p, "i32") for p in params}
    source = ASTSource(mma._mma_kernel, signature, constexprs={(params.index(k),): v for k, v in const.items()},
                       attrs={(params.index(p),): [["tt.divisibility", 16]] for p in (*MMA_POINTERS, *MMA_DIVISIBLE)})
    options = {"num_warps": num_warps, "num_stages": 1, "launch_pdl": True}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["cubin"]


def compile_dot_variant(overrides: dict, num_warps: int, num_stages: int) -> bytes:
    params = list(inspect.signature(dot._dot_kernel.fn).parameters)
    const = {**DOT_DEFAULTS, **overrides}
    signature = {p: "constexpr" if p in const else DOT_POINTERS.get(p, "i32") for p in params}
    source = ASTSource(dot._dot_kernel, signature, constexprs={(params.index(k),): v for k, v in const.items()},
                       attrs={(params.index(p),): [["tt.divisibility", 16]] for p in (*DOT_POINTERS, *DIVISIBLE,
                                                                                      "stride_xm")})
    options = {"num_warps": num_warps, "num_stages": num_stages, "launch_pdl": True}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["cubin"]


def compile_mma_dot_variant(overrides: dict, num_warps: int, num_stages: int) -> bytes:
    kernel = mma_dot._x_first_kernel if "CH" in overrides else mma_dot._mma_dot_kernel
    params = list(inspect.signature(kernel.fn).parameters)
    const = {**MMA_DOT_DEFAULTS, **overrides}
    signature = {p: "constexpr" if p in const else MMA_DOT_POINTERS.get(p, "i32") for p in params}
    divisible = (*MMA_DOT_POINTERS, *MMA_DIVISIBLE)
    source = ASTSource(kernel, signature, constexprs={(params.index(k),): v for k, v in const.items()},
                       attrs={(params.index(p),): [["tt.divisibility", 16]] for p in divisible})
    options = {"num_warps": num_warps, "num_stages": num_stages, "launch_pdl": True}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["cubin"]


def inspect_cubin(cubin: bytes) -> tuple[str, str, list[str], str]:
    """(registers, stack bytes a thread (spills), SASS opcodes, SASS text)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
        usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                               text=True).stdout
    lines = [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line)]
    ops = [re.sub(r"^\s*/\*[0-9a-f]+\*/\s*(@!?U?P\w+\s+)?", "", line).split()[0].split(".")[0] for line in lines]
    return re.search(r"REG:(\d+)", usage).group(1), re.search(r"STACK:(\d+)", usage).group(1), ops, sass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = p.add_mutually_exclusive_group()
    which.add_argument("--mma", action="store_true", help="the mma layout's kernel instead of the slots GEMV")
    which.add_argument("--dot", action="store_true", help="the slots layout's tensor-core kernel instead")
    which.add_argument("--mma-dot", action="store_true", help="the mma layout's tile kernel instead")
    p.add_argument("--dump", help="write each variant's SASS into this folder")
    args = p.parse_args()
    if args.mma_dot:
        variants = [(n, o, (w, st)) for n, o, w, st in MMA_DOT_VARIANTS]
        build, stem = compile_mma_dot_variant, "mma_dot"
    elif args.dot:
        variants, build, stem = [(n, o, (w, st)) for n, o, w, st in DOT_VARIANTS], compile_dot_variant, "dot"
    elif args.mma:
        variants, build, stem = [(n, o, (w,)) for n, o, w in MMA_VARIANTS], compile_mma_variant, "mma"
    else:
        variants, build, stem = [(n, o, (w,)) for n, o, w in VARIANTS], compile_variant, "gemv"
    print(f"triton {triton.__version__}, sm_90\n")
    print("| variant | registers | stack bytes | SASS | LDG | FFMA | LOP3 | MUFU | HMMA | HGMMA | wgmma waits | STS |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i, (name, overrides, launch) in enumerate(variants):
        try:
            regs, stack, ops, sass = inspect_cubin(build(overrides, *launch))
        except Exception as e:  # a variant the compiler refuses
            print(f"| {name} | ERROR {e!r:.150} |", flush=True)
            continue
        n = collections.Counter(ops)
        print(f"| {name} | {regs} | {stack} | {len(ops)} | {n['LDG']} | {n['FFMA']} | {n['LOP3']} | {n['MUFU']} "
              f"| {n['HMMA']} | {n['HGMMA']} | {sass.count('WARPGROUP.DEPBAR')} | {n['STS']} |", flush=True)
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            with open(os.path.join(args.dump, f"{stem}_{i}.sass"), "w") as f:
                f.write(sass)


if __name__ == "__main__":
    main()
