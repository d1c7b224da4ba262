"""Text <-> token ids for one model: `Tokenizer` (a thin wrapper over the HF tokenizer) and `StreamDecoder`.

Owns encoding, decoding, the BOS / EOS ids (the tokenizer's own plus generation_config.json's), the
special-token strings and chat template that `chat.template` renders with, and incremental
detokenization for streaming. Leaves rendering templates to `chat.template` and stopping to the engine.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lowbit.errors import LowbitError

_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")
_CONTEXT = 4  # prompt tokens a StreamDecoder keeps as context
_MAX_PENDING = 16  # tokens held back at most; valid UTF-8 completes a character within 4 byte tokens


@dataclass(frozen=True)
class Tokenizer:
    """A loaded HF tokenizer plus the stop ids the model's generation config adds to it."""

    hf: PreTrainedTokenizerBase
    eos_ids: tuple[int, ...]  # the tokenizer's eos first, then generation_config.json's, no repeats

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load from a model folder (or a Hub id; generation_config.json is then not read)."""
        try:
            hf = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            raise LowbitError(f"cannot load a tokenizer from {path}: {e}".splitlines()[0]) from e
        own = [] if hf.eos_token_id is None else [hf.eos_token_id]
        return cls(hf, tuple(dict.fromkeys(own + _generation_eos_ids(Path(path)))))

    @property
    def bos_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer can produce, added tokens included (the model's may be padded larger)."""
        return len(self.hf)

    @property
    def special_tokens(self) -> dict[str, str]:
        """bos_token / eos_token / unk_token / pad_token as strings, the ones this tokenizer has."""
        return {name: str(getattr(self.hf, name)) for name in _SPECIAL if getattr(self.hf, name, None) is not None}

    @property
    def chat_template(self) -> str | None:
        template = self.hf.chat_template
        return template.get("default") if isinstance(template, dict) else template

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids; `add_bos` adds the special tokens this tokenizer adds (if any), BOS never twice."""
        ids = list(self.hf.encode(text, add_special_tokens=add_bos))
        if add_bos and self.bos_id is not None and ids[:2] == [self.bos_id, self.bos_id]:
            ids = ids[1:]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text without special tokens and without "clean-up" (which rewrites " ." and " 's" in model output)."""
        return self.hf.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _generation_eos_ids(path: Path) -> list[int]:
    file = path / "generation_config.json"
    if not file.is_file():
        return []
    try:
        eos = json.loads(file.read_text(encoding="utf-8")).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError) as e:
        raise LowbitError(f"{file} is not a JSON object: {e}") from e
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(i) for i in eos]


class StreamDecoder:
    """Token ids in, text deltas out, for one sequence; the deltas plus `flush()` join to `decode(ids)`.

    The prefix-offset technique of TGI / vLLM `detokenize_incrementally`: decode a short window (the
    tokens of the last delta, then the new ones) and emit what the new tokens add to it. Decoding the
    new tokens alone would lose the leading space of a SentencePiece "▁word" (the decoder strips it at
    the start of a text). While the text ends in U+FFFD, a character is split over byte tokens and is
    held back. Special tokens, which `decode` skips, never enter the window, so it stays a few tokens.
    `context` (say the prompt's last ids) gives the first token its leading space.
    """

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()) -> None:
        self._decode = tokenizer.decode
        self._special = frozenset(i for i, t in tokenizer.hf.added_tokens_decoder.items() if t.special)
        self._ids = [i for i in context if i not in self._special][-_CONTEXT:]
        self._read = len(self._ids)  # ids[:read] are emitted and kept only as context

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while held back)."""
        if token_id in self._special:
            return ""
        self._ids.append(token_id)
        before, text = self._decode(self._ids[: self._read]), self._decode(self._ids)
        held = len(text) <= len(before) or text.endswith("\ufffd")
        if held and len(self._ids) - self._read < _MAX_PENDING:
            return ""
        return self._advance(text[len(before) :])

    def flush(self) -> str:
        """The text still held back (an incomplete character comes out as U+FFFD, as `decode` gives it)."""
        before, text = self._decode(self._ids[: self._read]), self._decode(self._ids)
        return self._advance(text[len(before) :])

    def _advance(self, delta: str) -> str:
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        return delta
