"""Fixtures shared by tests/quant (defined in tests/quant/tiny.py, which other test folders import)."""

from tests.quant.tiny import one_thread, tiny_model  # noqa: F401
