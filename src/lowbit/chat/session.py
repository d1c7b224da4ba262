"""A multi-turn conversation over the engine: history, template rendering, trimming to the context window.

`ChatSession.send(text)` renders the whole history with the chat template, drops the oldest turns when the
prompt would not leave room for the reply, streams the reply's text, and records it. The REPL in
`lowbit.cli` and the tests drive it; the server renders templates itself and talks to the engine directly.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

from lowbit.chat.template import ChatTemplate
from lowbit.engine.engine import Engine
from lowbit.engine.sampling import SamplingParams
from lowbit.errors import LowbitError


class ChatSession:
    def __init__(self, engine: Engine, template: ChatTemplate, params: SamplingParams, system: str | None = None):
        self.engine, self.template = engine, template
        self.params = dataclasses.replace(params, stop=tuple(dict.fromkeys(params.stop + template.stop)))
        self.system = system
        self.turns: list[dict[str, str]] = []

    def reset(self) -> None:
        self.turns = []

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    def messages(self, user_text: str | None = None) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        tail = [{"role": "user", "content": user_text}] if user_text is not None else []
        return head + self.turns + tail

    def prompt_ids(self, user_text: str) -> list[int]:
        """Token ids of the rendered conversation, oldest turns dropped until the reply has room."""
        budget = self.engine.max_seq_len - min(self.params.max_new_tokens, self.engine.max_seq_len // 2)
        while True:
            text = self.template.render(self.messages(user_text), add_generation_prompt=True,
                                        **self.engine.tokenizer.special_tokens)
            ids = self.engine.tokenizer.encode(text, add_bos=False)
            if len(ids) <= budget:
                return ids
            if not self.turns:
                raise LowbitError(f"the message is too long: {len(ids)} tokens, the context leaves room for {budget}")
            self.turns = self.turns[2:]  # forget the oldest user/assistant exchange

    def send(self, user_text: str) -> Iterator[str]:
        """Stream the assistant's reply; it joins the history once complete (or when the caller stops)."""
        ids = self.prompt_ids(user_text)
        reply = []
        try:
            for out in self.engine.stream(ids, self.params):
                if out.delta_text:
                    reply.append(out.delta_text)
                    yield out.delta_text
        finally:
            self.turns += [{"role": "user", "content": user_text},
                           {"role": "assistant", "content": "".join(reply).strip()}]
