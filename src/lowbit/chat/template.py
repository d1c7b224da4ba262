"""Chat templates: turn a list of messages into the exact prompt text a chat model was trained on.

Owns the sandboxed Jinja environment (the same globals and filters as transformers' `apply_chat_template`),
the registry of named fallback templates kept as data, and each template's stop strings. It knows nothing
about tokenizers, models or the engine: templates and special tokens come in as plain strings.

BOS rule: like Hugging Face templates, the rendered text is the complete model input. It holds BOS where
the model expects one (the LLaMA-family fallbacks open with `{{ bos_token }}`), so encode it with
`add_special_tokens=False`; letting the tokenizer add its own BOS as well would double it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lowbit.errors import LowbitError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template plus what a caller needs around it.

    `special_tokens` are (name, text) pairs bound to the template, such as ("bos_token", "<s>"); tokens
    passed to `render` override them. `default_system` is prepended as a system message when the
    conversation does not open with one.
    """

    name: str
    source: str  # Jinja source
    stop: tuple[str, ...] = ()  # strings that end the assistant's turn in generated text
    default_system: str | None = None
    special_tokens: tuple[tuple[str, str], ...] = ()

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **special_tokens) -> str:
        """The prompt text for `messages`, ending with the assistant's header when `add_generation_prompt`."""
        messages = _checked(messages)
        if self.default_system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.default_system}, *messages]
        tokens = {**dict(self.special_tokens), **_token_texts(special_tokens)}
        context = {**tokens, "messages": messages, "add_generation_prompt": add_generation_prompt,
                   "tools": None, "documents": None}
        try:
            return _compile(self.source).render(context)
        except TemplateError as e:
            raise LowbitError(f"chat template {self.name!r}: {_one_line(e)}") from e


def render(template: ChatTemplate, messages: list[dict], add_generation_prompt: bool = True,
           special_tokens: Mapping[str, str] | None = None) -> str:
    """Functional form of `ChatTemplate.render`."""
    return template.render(messages, add_generation_prompt, **(special_tokens or {}))


# ---- the sandbox: transformers' environment (utils/chat_template_utils.py), compiled once per source ----

class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant tokens for training in HF); renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, as transformers does, so no dunder can be planted."""

    def __init__(*args, **kwargs):
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for key in attrs:
            _Namespace._check(key)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, key, value):
        _Namespace._check(key)
        jinja2.utils.Namespace.__setitem__(self, key, value)

    @staticmethod
    def _check(key):
        if isinstance(key, str) and key.startswith("_"):
            raise SecurityError(f"namespace attribute {key!r} may not start with an underscore")


class _Sandbox(ImmutableSandboxedEnvironment):
    """Fails at once on an unsafe attribute (`''.__class__`) instead of rendering it as empty text."""

    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} is unsafe")


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' override: no HTML escaping, with indent/separators/sort_keys exposed.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _make_env() -> _Sandbox:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=lambda *a, **kw: dict(*a, **kw), namespace=_Namespace)
    return env


_ENV = _make_env()


@functools.lru_cache(maxsize=64)
def _compile(source: str) -> jinja2.Template:
    return _ENV.from_string(source)  # a syntax error raises TemplateError, which `render` reports


# ---- inputs ----

def _checked(messages) -> list[dict]:
    """Plain {"role", "content"} copies of `messages`; LowbitError for anything a template can't take."""
    if not messages:
        raise LowbitError("a chat needs at least one message")
    out = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, Mapping) else None
        if role not in ROLES:
            raise LowbitError(f"message {i}: role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(m.get("content"), str):
            raise LowbitError(f"message {i} ({role}): content must be a string, got {m.get('content')!r}")
        out.append({"role": str(role), "content": str.__str__(m["content"])})
    return out


def _token_texts(special_tokens: Mapping) -> dict[str, str]:
    """{name: text} from tokenizer-config style tokens; AddedToken dicts give their "content"; lists dropped."""
    out = {}
    for key, value in special_tokens.items():
        if isinstance(value, Mapping):
            value = value.get("content")
        if isinstance(value, str):
            out[str(key)] = str.__str__(value)
    return out


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


# ---- named fallbacks, for models whose tokenizer has no chat_template ----

def _turns(roles: str, reply: str, bos: bool = True) -> str:
    """Jinja source for the common shape: each message is prefix + content + suffix, picked by its role.

    `roles` is a Jinja dict literal {role: [prefix, suffix]} (values may name special tokens); `reply` is
    the assistant header that the generation prompt ends with.
    """
    head = "{{ bos_token }}" if bos else ""
    return (head + "{% set roles = " + roles + " %}"
            "{% for m in messages %}{{ roles[m.role][0] + m.content + roles[m.role][1] }}{% endfor %}"
            "{% if add_generation_prompt %}{{ " + reply + " }}{% endif %}")


# Meta's format (llama/generation.py `chat_completion`; the official Llama-2-chat tokenizer template):
# system folded into the first user turn, every exchange wrapped in BOS ... EOS, contents stripped.
_LLAMA2 = (
    "{% if messages[0].role == 'system' %}"
    "{% set sys = '<<SYS>>\n' + messages[0].content + '\n<</SYS>>\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set sys = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}"
    "{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('llama-2-chat needs user and assistant turns to alternate, starting with user') }}"
    "{% endif %}"
    "{% if m.role == 'user' %}"
    "{{ bos_token + '[INST] ' + ((sys if loop.first else '') + m.content).strip() + ' [/INST]' }}"
    "{% else %}{{ ' ' + m.content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

_LLAMA_TOKENS = (("bos_token", "<s>"), ("eos_token", "</s>"))

_FALLBACK_LIST = (
    ChatTemplate(  # FastChat `vicuna_v1.1`: ADD_COLON_TWO, sep " ", sep2 "</s>"
        name="vicuna_v1.1",
        source=_turns('{"system": ["", " "], "user": ["USER: ", " "], "assistant": ["ASSISTANT: ", eos_token]}',
                      '"ASSISTANT:"'),
        stop=("USER:", "</s>"),
        default_system="A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        special_tokens=_LLAMA_TOKENS,
    ),
    ChatTemplate(  # Guanaco as its model cards show it: "### Human: {prompt}\n### Assistant:"
        name="guanaco",
        source=_turns('{"system": ["", "\n"], "user": ["### Human: ", "\n"], "assistant": ["### Assistant: ", "\n"]}',
                      '"### Assistant:"'),
        stop=("### Human:",),
        special_tokens=_LLAMA_TOKENS,
    ),
    ChatTemplate(name="llama-2-chat", source=_LLAMA2, stop=("[INST]",), special_tokens=_LLAMA_TOKENS),
    ChatTemplate(  # Stanford Alpaca's no-input prompt; later exchanges repeat Instruction/Response
        name="alpaca",
        source=_turns('{"system": ["", "\n\n"], "user": ["### Instruction:\n", "\n\n"],'
                      ' "assistant": ["### Response:\n", "\n\n"]}', '"### Response:\n"'),
        stop=("### Instruction:",),
        default_system="Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.",
        special_tokens=_LLAMA_TOKENS,
    ),
    ChatTemplate(  # ChatML; no BOS, as in SmolLM2's and Qwen's own templates
        name="chatml",
        source=_turns('{"system": ["<|im_start|>system\n", "<|im_end|>\n"], "user": ["<|im_start|>user\n",'
                      ' "<|im_end|>\n"], "assistant": ["<|im_start|>assistant\n", "<|im_end|>\n"]}',
                      '"<|im_start|>assistant\n"', bos=False),
        stop=("<|im_end|>",),
    ),
)

FALLBACKS: Mapping[str, ChatTemplate] = MappingProxyType({t.name: t for t in _FALLBACK_LIST})


def get(name: str) -> ChatTemplate:
    """A copy of the fallback template called `name`."""
    if name not in FALLBACKS:
        raise LowbitError(f"unknown chat template {name!r}; known: {', '.join(FALLBACKS)}")
    return dataclasses.replace(FALLBACKS[name])


def from_tokenizer_config(chat_template: str | list | None, special_tokens: Mapping,
                          fallback: str | None = None) -> ChatTemplate:
    """The model's own template (tokenizer_config.json "chat_template"), else the named fallback.

    Either way the model's special tokens are bound to the result and its EOS text joins the stop strings.
    A list of {"name", "template"} entries (named templates) means its "default" one.
    """
    tokens = _token_texts(special_tokens)
    if isinstance(chat_template, list):
        chat_template = {t.get("name"): t.get("template") for t in chat_template}.get("default")
    if chat_template:
        template = ChatTemplate(name="model", source=chat_template)
    elif fallback is not None:
        template = get(fallback)
    else:
        raise LowbitError(f"the tokenizer has no chat_template; pick a fallback: {', '.join(FALLBACKS)}")
    eos = (tokens["eos_token"],) if tokens.get("eos_token") and tokens["eos_token"] not in template.stop else ()
    bound = {**dict(template.special_tokens), **tokens}
    return dataclasses.replace(template, stop=template.stop + eos, special_tokens=tuple(bound.items()))
