"""Which requests run in the next step, and with how many tokens: `schedule() -> {request_id: num_tokens}`.

Requests wait in FIFO order and are admitted while the KV cache has free slots; an admitted request is
prefilled with its whole prompt, then decodes one token per step. A request that has waited longer than
`max_wait_s` is given up (`expire`), so an overloaded server answers "busy" instead of hanging. Prefill and decode share this one
interface, so chunked prefill or paging can change the policy without touching the engine. No torch here.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

Step = dict[str, int]


class Scheduler:
    def __init__(self, max_waiting: int | None = None, max_wait_s: float | None = None):
        self.max_waiting, self.max_wait_s = max_waiting, max_wait_s
        self.waiting: OrderedDict[str, int] = OrderedDict()  # request_id -> prompt length
        self.since: dict[str, float] = {}  # request_id -> when it was queued (the caller's clock)
        self.running: dict[str, None] = {}  # request_id -> (insertion order = admission order)

    def add(self, request_id: str, prompt_len: int, now: float = 0.0) -> bool:
        """Queue a request; False when the waiting queue is full (the caller reports overload)."""
        if self.max_waiting is not None and len(self.waiting) >= self.max_waiting:
            return False
        self.waiting[request_id] = prompt_len
        self.since[request_id] = now
        return True

    def expire(self, now: float) -> list[str]:
        """Drop and return the waiting requests queued more than max_wait_s before `now` (oldest first)."""
        if self.max_wait_s is None:
            return []
        late = [rid for rid in self.waiting if now - self.since[rid] > self.max_wait_s]
        for rid in late:
            self.finish(rid)
        return late

    def schedule(self, allocate: Callable[[str], bool]) -> Step:
        """Decode every running request; admit waiting ones while `allocate(request_id)` finds them a slot."""
        step: Step = {rid: 1 for rid in self.running}
        while self.waiting:
            rid, prompt_len = next(iter(self.waiting.items()))
            if not allocate(rid):
                break
            del self.waiting[rid], self.since[rid]
            self.running[rid] = None
            step[rid] = prompt_len
        return step

    def finish(self, request_id: str) -> None:
        """Forget a request, whether running or still waiting."""
        self.running.pop(request_id, None)
        self.waiting.pop(request_id, None)
        self.since.pop(request_id, None)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)
