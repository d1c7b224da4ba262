"""Which requests run in the next step, and with how many tokens: `schedule() -> {request_id: num_tokens}`.

Requests wait in FIFO order and are admitted while the KV cache has free slots; an admitted request is
prefilled with its whole prompt, then decodes one token per step. Prefill and decode share this one
interface, so chunked prefill or paging can change the policy without touching the engine. No torch here.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

Step = dict[str, int]


class Scheduler:
    def __init__(self, max_waiting: int | None = None):
        self.max_waiting = max_waiting
        self.waiting: OrderedDict[str, int] = OrderedDict()  # request_id -> prompt length
        self.running: dict[str, None] = {}  # request_id -> (insertion order = admission order)

    def add(self, request_id: str, prompt_len: int) -> bool:
        """Queue a request; False when the waiting queue is full (the caller reports overload)."""
        if self.max_waiting is not None and len(self.waiting) >= self.max_waiting:
            return False
        self.waiting[request_id] = prompt_len
        return True

    def schedule(self, allocate: Callable[[str], bool]) -> Step:
        """Decode every running request; admit waiting ones while `allocate(request_id)` finds them a slot."""
        step: Step = {rid: 1 for rid in self.running}
        while self.waiting:
            rid, prompt_len = next(iter(self.waiting.items()))
            if not allocate(rid):
                break
            del self.waiting[rid]
            self.running[rid] = None
            step[rid] = prompt_len
        return step

    def finish(self, request_id: str) -> None:
        """Forget a request, whether running or still waiting."""
        self.running.pop(request_id, None)
        self.waiting.pop(request_id, None)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)
