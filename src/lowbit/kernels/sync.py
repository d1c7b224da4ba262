"""How the kernels order their memory against other programs and other kernels on the GPU.

Two mechanisms:
- the split-K fence: a program's partial sums are made visible GPU-wide before it bumps a tile counter, so the
  last program to arrive can sum them (`fence_gpu`);
- programmatic dependent launch (PDL, Hopper and later): a kernel launched with `launch_pdl` may start while the
  kernel before it is still finishing; it loads what no kernel writes (weights) right away and calls
  `wait_previous` before touching anything an earlier kernel wrote, and calls `release_next` early so the
  kernel after it can do the same. A decode step is a chain of ~10 short kernels a layer, so the launch gap
  and each kernel's ramp-up and tail are a large share of it; PDL overlaps them. It works inside CUDA graphs.

Every kernel launched with PDL must call `wait_previous` in every program before its first load of data an
earlier kernel of the PDL chain may write, and before its first store: the kernel before it may still be
reading or writing. A plain launch (a torch op) starts only after everything before it has finished, so data
written before the chain's last plain launch and not by the chain since may be read early (decode attention
reads positions and cached keys that way).
`pdl_launch` says whether to use it for a tensor's device (and gives the launch keyword); `LOWBIT_PDL=0`
turns it off.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs, "runtime"):
        return bool(getattr(knobs.runtime, "interpret", False))
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _pdl_device(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def pdl_enabled(t: torch.Tensor) -> bool:
    """Whether kernels on t's device launch with PDL: CUDA compute capability 9+ (Hopper), compiled (not the
    interpreter), and LOWBIT_PDL not set to 0."""
    return (t.is_cuda and not interpreting() and os.environ.get("LOWBIT_PDL", "1") != "0"
            and _pdl_device(t.device))


def pdl_launch(t: torch.Tensor) -> dict:
    """The launch keywords for a PDL kernel on t's device: {"PDL": flag} plus `launch_pdl` where enabled."""
    on = pdl_enabled(t)
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


# The address of a device buffer that `trace` appends to, set by `benchmarks/trace_step.py` before any kernel
# compiles (with a fresh Triton cache); 0, the default, compiles every trace point to nothing.
TRACE = tl.constexpr(0)
TRACE_HEADER, TRACE_RECORD = 64, 32  # bytes: the record counter (int32 at 0), then the records
_TRACE_ASM = tl.constexpr("""{
.reg .pred p;
.reg .b32 t, i, lo, hi, sm, x, y, z, nx, ny, nz;
.reg .b64 g, r;
mov.u32 t, %tid.x;
setp.eq.u32 p, t, 0;
mov.u64 g, %globaltimer;
mov.b64 {lo, hi}, g;
mov.u32 sm, %smid;
mov.u32 x, %ctaid.x;
mov.u32 y, %ctaid.y;
mov.u32 z, %ctaid.z;
mov.u32 nx, %nctaid.x;
mov.u32 ny, %nctaid.y;
mov.u32 nz, %nctaid.z;
shl.b32 t, $2, 16;
or.b32 sm, sm, t;
shl.b32 ny, ny, 16;
or.b32 ny, ny, nz;
@p atom.global.add.u32 i, [$1], 1;
@p mul.wide.u32 r, i, 32;
@p add.u64 r, r, $1;
@p st.global.v4.b32 [r+64], {lo, hi, sm, x};
@p st.global.v4.b32 [r+80], {y, z, nx, ny};
mov.b32 $0, 0;
}""")


@triton.jit
def trace(event: tl.constexpr):
    """With TRACE set: thread 0 of the program appends one record (`TRACE_RECORD` bytes: %globaltimer as two
    words, %smid | event << 16, block index x, y, z, grid size x, y << 16 | z) to the TRACE buffer. Events: 0 the
    program started (`release_next`), 1 its wait ended (`wait_previous`), 2 it ended (the kernels' last lines)."""
    if TRACE:
        tl.inline_asm_elementwise(_TRACE_ASM, "=r,l,r", [tl.full([], TRACE, tl.int64), tl.full([], event, tl.int32)],
                                  dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def wait_previous(PDL: tl.constexpr):
    """Block until the kernels before this one have finished and their writes are visible (no-op without PDL)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        trace(1)


@triton.jit
def release_next(PDL: tl.constexpr):
    """Let the next kernel launch once every program of this one has called this (no-op without PDL)."""
    if PDL:
        trace(0)
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def fence_gpu(t):
    """Make this thread's earlier global stores visible GPU-wide (split-K partials before the tile counter)."""
    tl.inline_asm_elementwise("fence.acq_rel.gpu;\n\tmov.b32 $0, $1;", "=r,r", [t], dtype=tl.int32,
                              is_pure=False, pack=1)
