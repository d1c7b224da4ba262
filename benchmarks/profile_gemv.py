"""One M=1 qmatmul launch (4-bit g128, 4096 -> 12288, the fused q/k/v) for Nsight Compute, to see what bounds
the GEMV. The launcher config comes from $GEMV_CONFIG (JSON, qmatmul's gemv keywords; "m", "kernel" and
"add": true, the GEMV adding into float32 as one-row decode runs it, pick the launch):
    GEMV_CONFIG='{"BN": 256, "num_warps": 2}' ncu --kernel-name regex:_gemv_kernel --launch-skip 3 \
        --launch-count 1 --section SpeedOfLight --section WarpStateStats python3 benchmarks/profile_gemv.py
"""

import json
import os

import torch

from lowbit.kernels.qmatmul import qmatmul, repack
from lowbit.quant import pack

k, n = 4096, 3 * 4096
config = json.loads(os.environ.get("GEMV_CONFIG", "{}"))
m, kernel = config.pop("m", 1), config.pop("kernel", "gemv")  # e.g. {"m": 16, "kernel": "dot", ...}
add = config.pop("add", False)  # {"add": true}: the GEMV adding into float32, as one-row decode runs it
codes = torch.randint(0, 16, (k, n), device="cuda", dtype=torch.uint8)
zeros = torch.randint(0, 16, (k // 128, n), device="cuda", dtype=torch.int32)
scales = torch.rand(k // 128, n, device="cuda").half() * 0.01
ws = [repack(codes, zeros, scales, pack.default_g_idx(k, 128).cuda(), 4, "slots") for _ in range(8)]  # > L2
x = torch.randn(m, k, device="cuda").half()
out = torch.zeros(m, n, device="cuda")
for i in range(8):
    if add:
        qmatmul(x, ws[i], kernel=kernel, config=config, out=out, accumulate=True)
    else:
        qmatmul(x, ws[i], kernel=kernel, config=config)
torch.cuda.synchronize()
