"""One M=1 qmatmul launch (4-bit g128, 4096 -> 11008) for Nsight Compute, to see what bounds the GEMV:
    ncu --kernel-name regex:_gemv_kernel --launch-skip 3 --launch-count 1 --section SpeedOfLight \
        --section WarpStateStats --section Occupancy python3 benchmarks/profile_gemv.py
"""

import torch

from lowbit.kernels.qmatmul import qmatmul, repack
from lowbit.quant import pack

k, n = 4096, 11008
codes = torch.randint(0, 16, (k, n), device="cuda", dtype=torch.uint8)
zeros = torch.randint(0, 16, (k // 128, n), device="cuda", dtype=torch.int32)
scales = torch.rand(k // 128, n, device="cuda").half() * 0.01
w = repack(codes, zeros, scales, pack.default_g_idx(k, 128).cuda(), 4)
x = torch.randn(1, k, device="cuda").half()
for _ in range(5):
    qmatmul(x, w)
torch.cuda.synchronize()
