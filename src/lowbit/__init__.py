"""lowbit: GPTQ quantization and fast low-bit inference for LLaMA-family chat models.

This module only re-exports the public API; each concept lives in its own module.
"""

__version__ = "0.1.0"
