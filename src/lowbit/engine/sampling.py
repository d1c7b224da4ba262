"""Next-token sampling: `SamplingParams`, the penalty history, and `sample(logits, ...) -> tokens`.

Owns turning one step's logits [B, V] into B next tokens, each row under its own params. Leaves stop
strings / stop ids / max_new_tokens / ignore_eos to the engine (the fields live here because they are
part of a request's params), and leaves keeping `PenaltyHistory` and the generators to the engine.

`process_logits` is the pipeline below; its order and semantics are those of HF transformers `generate`
(`GenerationMixin._get_logits_processor` in `transformers/generation/utils.py`, the processors in
`generation/logits_process.py`), with min_tokens_to_keep=1. Removed tokens get -inf. Each row:

  1. repetition_penalty  seen (prompt or output) tokens: l / p if l >= 0 else l * p (HF/CTRL)
  2. frequency_penalty,  l - frequency * count - presence * (count > 0), count over output tokens
     presence_penalty    (OpenAI; HF has none; after 1 as in vLLM)
     -- greedy rows (temperature == 0) stop here; `sample` takes their argmax --
  3. temperature         l / T
  4. top_k               drop l < the k-th largest l (ties with the k-th stay)
  5. top_p               sort ascending, drop tokens whose cumulative prob <= 1 - top_p; so the token that
                         crosses the threshold stays, and so does the most likely one
  6. min_p               drop p < min_p * max(p) (the most likely token stays since min_p <= 1)
  7. typical_p           entropy H = -sum p log p; sort by |-log p - H| ascending, keep the shortest prefix
                         whose mass reaches typical_p (the token that crosses it and the first one stay)
  8. draw                argmax(softmax(l) / q), q ~ Exponential(1): an exact categorical draw with no
                         host sync; a seeded row draws q from its own generator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops (OpenAI / HF field names)."""

    temperature: float = 1.0  # 0 => greedy
    top_k: int = 0  # 0 => off
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0  # HF/CTRL semantics over prompt + generated tokens
    presence_penalty: float = 0.0  # OpenAI semantics over generated tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise LowbitError(f"{name} must be a sequence, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for ok, message in _checks(self):
            if not ok:
                raise LowbitError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _checks(p: SamplingParams) -> list[tuple[bool, str]]:
    def between(name: str, lo: float, hi: float, lo_open: bool = False) -> tuple[bool, str]:
        v = getattr(p, name)
        ok = math.isfinite(v) and (lo < v if lo_open else lo <= v) and v <= hi
        return ok, f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}"

    return [
        (math.isfinite(p.temperature) and p.temperature >= 0, f"temperature must be >= 0, got {p.temperature}"),
        (isinstance(p.top_k, int) and p.top_k >= 0, f"top_k must be an int >= 0 (0 = off), got {p.top_k}"),
        between("top_p", 0, 1, lo_open=True),
        between("min_p", 0, 1),
        between("typical_p", 0, 1, lo_open=True),
        (
            math.isfinite(p.repetition_penalty) and p.repetition_penalty > 0,
            f"repetition_penalty must be > 0, got {p.repetition_penalty}",
        ),
        between("presence_penalty", -2, 2),
        between("frequency_penalty", -2, 2),
        (p.seed is None or 0 <= p.seed < 2**64, f"seed must be in [0, 2**64), got {p.seed}"),
        (p.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {p.max_new_tokens}"),
        (all(isinstance(s, str) and s for s in p.stop), f"stop must hold non-empty strings, got {p.stop}"),
        (all(t >= 0 for t in p.stop_token_ids), f"stop_token_ids must be >= 0, got {p.stop_token_ids}"),
    ]


@dataclass(frozen=True)
class PenaltyHistory:
    """What the penalties read; one row per batch slot, on the logits' device, owned by the engine.

    seen   [B, V] bool   the token occurs in the prompt or the output (repetition_penalty)
    counts [B, V] int32  times the token was generated (presence / frequency penalties)
    """

    seen: Tensor
    counts: Tensor

    @classmethod
    def empty(cls, batch: int, vocab_size: int, device: torch.device | str = "cpu") -> PenaltyHistory:
        return cls(
            torch.zeros(batch, vocab_size, dtype=torch.bool, device=device),
            torch.zeros(batch, vocab_size, dtype=torch.int32, device=device),
        )

    def start(self, row: int, prompt_ids: Sequence[int] | Tensor) -> None:
        """Give slot `row` to a new request with this prompt (ids < vocab_size)."""
        ids = _to_device(torch.as_tensor(prompt_ids, dtype=torch.long), self.seen.device)
        self.seen[row] = False
        self.counts[row] = 0
        self.seen[row].index_fill_(0, ids, True)

    def append(self, tokens: Tensor, rows: Tensor | None = None) -> None:
        """Record sampled `tokens` [N] for slots `rows` [N] (default: all B slots, N = B)."""
        if rows is None:
            rows = torch.arange(tokens.shape[0], device=tokens.device)
        self.seen.index_put_((rows, tokens), torch.ones_like(tokens, dtype=torch.bool))
        self.counts.index_put_((rows, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)

    def select(self, rows: Tensor) -> PenaltyHistory:
        """The history of slots `rows` (a copy), to match the logits of a partial batch."""
        return PenaltyHistory(self.seen[rows], self.counts[rows])


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The per-request generator for a seeded request (None: use the default generator)."""
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


_COLUMNS = ("greedy", "repetition_penalty", "presence_penalty", "frequency_penalty")
_COLUMNS += ("temperature", "top_k", "top_p_cut", "min_p", "typical_p")  # `_row` builds them in this order


def _row(p: SamplingParams) -> tuple[float, ...]:
    """One row of the per-row table; greedy rows get each sampling stage's "off" value."""
    warp = (p.temperature, p.top_k, 1.0 - p.top_p, p.min_p, p.typical_p)  # 1 - top_p in fp64, as HF has it
    warp = (1.0, 0, 0.0, 0.0, 1.0) if p.greedy else warp
    return (float(p.greedy), p.repetition_penalty, p.presence_penalty, p.frequency_penalty, *warp)


def _columns(params: Sequence[SamplingParams], device: torch.device) -> dict[str, Tensor]:
    """Each per-row value as a [B, 1] float32 tensor, from one host-to-device copy that does not sync."""
    table = _to_device(torch.tensor([_row(p) for p in params], dtype=torch.float32), device)
    return {name: table[:, i : i + 1] for i, name in enumerate(_COLUMNS)}


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """Copy a small CPU tensor to `device` through pinned memory: a plain `.to(cuda)` syncs the stream."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def process_logits(logits: Tensor, params: Sequence[SamplingParams], history: PenaltyHistory | None = None) -> Tensor:
    """Steps 1-7 of the pipeline: logits [B, V] -> float32 [B, V], -inf where a token was removed."""
    return _process(logits, params, history)[0]


def _process(
    logits: Tensor, params: Sequence[SamplingParams], history: PenaltyHistory | None
) -> tuple[Tensor, dict[str, Tensor]]:
    if len(params) != logits.shape[0]:
        raise ValueError(f"{len(params)} params for {logits.shape[0]} rows of logits")
    col = _columns(params, logits.device)
    warped = [p for p in params if not p.greedy]
    l = logits.float()
    if any(p.repetition_penalty != 1 for p in params):
        l = _repetition_penalty(l, _need(history).seen, col["repetition_penalty"])
    if any(p.presence_penalty != 0 or p.frequency_penalty != 0 for p in params):
        l = _openai_penalties(l, _need(history).counts, col["presence_penalty"], col["frequency_penalty"])
    if any(p.temperature != 1 for p in warped):
        l = l / col["temperature"]
    if any(p.top_k > 0 for p in warped):
        l = _top_k(l, col["top_k"], max(min(p.top_k, l.shape[-1]) for p in warped))
    if any(p.top_p < 1 for p in warped):
        l = _top_p(l, col["top_p_cut"])
    if any(p.min_p > 0 for p in warped):
        l = _min_p(l, col["min_p"])
    if any(p.typical_p < 1 for p in warped):
        l = _typical_p(l, col["typical_p"])
    return l, col


def sample(
    logits: Tensor,
    params: Sequence[SamplingParams],
    history: PenaltyHistory | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
) -> Tensor:
    """The whole pipeline: logits [B, V] -> next tokens [B] int64, without syncing with the host."""
    l, col = _process(logits, params, history)
    if all(p.greedy for p in params):
        return l.argmax(-1)
    drawn = _draw(l.softmax(-1), generators or [None] * len(params))
    if not any(p.greedy for p in params):
        return drawn
    return torch.where(col["greedy"][:, 0] > 0, l.argmax(-1), drawn)


def _need(history: PenaltyHistory | None) -> PenaltyHistory:
    if history is None:
        raise ValueError("penalties need a PenaltyHistory")
    return history


def _repetition_penalty(l: Tensor, seen: Tensor, penalty: Tensor) -> Tensor:
    return torch.where(seen, torch.where(l < 0, l * penalty, l / penalty), l)


def _openai_penalties(l: Tensor, counts: Tensor, presence: Tensor, frequency: Tensor) -> Tensor:
    return l - frequency * counts.to(l.dtype) - presence * (counts > 0).to(l.dtype)


def _top_k(l: Tensor, k: Tensor, k_max: int) -> Tensor:
    """k [B, 1]: 0 = off; k_max: the largest k in the batch, clipped to V."""
    kth = torch.topk(l, k_max, dim=-1).values.gather(-1, k.long().clamp(1, k_max) - 1)
    return l.masked_fill((l < kth) & (k > 0), -math.inf)


def _top_p(l: Tensor, cut: Tensor) -> Tensor:
    """cut [B, 1] = 1 - top_p: 0 = off."""
    sorted_l, index = torch.sort(l, descending=False)
    remove = sorted_l.softmax(-1).cumsum(-1) <= cut
    remove[:, -1] = False
    remove &= cut > 0
    return l.masked_fill(remove.scatter(1, index, remove), -math.inf)


def _min_p(l: Tensor, min_p: Tensor) -> Tensor:
    """min_p [B, 1]: 0 = off."""
    probs = l.softmax(-1)
    return l.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), -math.inf)


def _typical_p(l: Tensor, mass: Tensor) -> Tensor:
    """mass [B, 1]: 1 = off."""
    logp = l.log_softmax(-1)
    entropy = -(logp * logp.exp()).nansum(-1, keepdim=True)
    sorted_shift, index = torch.sort((-logp - entropy).abs(), descending=False)
    cumulative = l.gather(-1, index).softmax(-1).cumsum(-1)
    last = (cumulative < mass).sum(-1, keepdim=True).clamp_(max=l.shape[-1] - 1)
    remove = sorted_shift > sorted_shift.gather(-1, last)  # never the first: min_tokens_to_keep=1 holds
    remove &= mass < 1
    return l.masked_fill(remove.scatter(1, index, remove), -math.inf)


def _draw(probs: Tensor, generators: Sequence[torch.Generator | None]) -> Tensor:
    """argmax(probs / q), q ~ Exp(1) (gpt-fast `multinomial_sample_one_no_sync`); seeded rows use their own."""
    q = torch.empty_like(probs).exponential_(1)
    for row, generator in enumerate(generators):
        if generator is not None:
            q[row].exponential_(1, generator=generator)
    return (probs / q.clamp_min_(torch.finfo(q.dtype).tiny)).argmax(-1)
