"""What the kernel tests share: the device they run on and the interpreter's known gap."""

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def skip_bf16_interpreted(dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("Triton's interpreter has no working bfloat16 (checked on the GPU)")
