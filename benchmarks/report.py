"""A GPU benchmark's markdown report: each line printed as it comes and kept, then the whole of it written to
$OUT/<name> (the folder the device tool brings back) when that is set. One list for the process: the scripts
that import each other's helpers (decode_sweep from profile_decode, dequant_speed from kernels) share it."""

from __future__ import annotations

import os

LINES: list[str] = []


def say(*parts) -> None:
    line = " ".join(str(p) for p in parts)
    LINES.append(line)
    print(line, flush=True)


def save(name: str) -> None:
    """The report so far into $OUT/name (nothing without $OUT)."""
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, name), "w") as f:
            f.write("\n".join(LINES) + "\n")
