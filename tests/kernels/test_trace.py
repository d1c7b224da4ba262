"""`lowbit.kernels.sync.trace`: with a buffer address set, the PDL kernels compile in their three trace points
(start, wait ended, end); without one, none. Compiled offline for sm_90 in a fresh process and Triton cache
(setting the address changes a global the kernels read at compile time)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = """
import inspect, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lowbit.kernels import norm_rope, sync
sync.TRACE = tl.constexpr(int(sys.argv[1]))
kernel = norm_rope._rms_norm_kernel
params = list(inspect.signature(kernel.fn).parameters)
const = dict(HAS_RES=False, HAS_SRC=False, ROUND_TO_Y=True, BLOCK=256, SLICE=256, PDL=True)
pointers = {p: "*fp32" for p in params if p.endswith("_ptr")}
pointers["src_ptr"] = "*i32"
signature = {p: "constexpr" if p in const else pointers.get(p, "fp32" if p == "eps" else "i32") for p in params}
source = ASTSource(kernel, signature, constexprs={(params.index(k),): v for k, v in const.items()})
ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "launch_pdl": True}).asm["ptx"]
print(ptx.count("%globaltimer"), ptx.count("atom.global.add.u32"))
"""


@pytest.mark.parametrize("address,points", [(0, 0), (1 << 40, 3)])
def test_trace_points_compile_in_only_with_a_buffer(tmp_path, address, points):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(address)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(points), str(points)]  # timer reads, record counter bumps
