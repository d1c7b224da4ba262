"""A generation request's state and what the engine reports about it each step.

`Request` holds ids, the slot it occupies, and the text produced so far; `StopStrings` decides how much of
that text can be released while a stop string might still be forming. `RequestOutput` is the only thing
callers (chat, server, benchmarks) see.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from lowbit.engine.sampling import SamplingParams


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id, or a stop string
    LENGTH = "length"  # max_new_tokens or the context window
    ABORT = "abort"
    TIMEOUT = "timeout"  # waited longer than EngineConfig.max_wait_s for a slot; never started


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    delta_text: str
    new_token_ids: tuple[int, ...]
    num_prompt_tokens: int
    num_output_tokens: int
    finish_reason: FinishReason | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class StopStrings:
    """Holds back text that could be the start of a stop string; cuts the text at the first full match."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.text = ""
        self.released = 0

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add decoded text; return (text safe to release now, whether a stop string matched)."""
        start = max(0, self.released - max((len(s) for s in self.stops), default=0))
        self.text += delta
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            out, self.released = self.text[self.released:end], end
            return out, True
        end = len(self.text) - self._partial_suffix()
        out, self.released = self.text[self.released:end], max(self.released, end)
        return out, False

    def flush(self) -> str:
        out, self.released = self.text[self.released:], len(self.text)
        return out

    def _partial_suffix(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    output_ids: list[int] = field(default_factory=list)
    slot: int | None = None
    finish_reason: FinishReason | None = None

    @property
    def length(self) -> int:
        """Tokens whose keys are (or are about to be) in the cache."""
        return len(self.prompt_ids) + len(self.output_ids)
