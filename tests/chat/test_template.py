"""Chat templates: golden strings for every fallback, and the model-template path against transformers."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lowbit.chat import template as T
from lowbit.errors import LowbitError

ONE = [{"role": "user", "content": "Hi"}]
SYS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
MULTI = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "How are you?"},
]

VICUNA_SYS = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ALPACA_SYS = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)

GOLDEN = [
    # vicuna_v1.1: FastChat lm-sys/FastChat fastchat/conversation.py, ADD_COLON_TWO, sep " ", sep2 "</s>"
    ("vicuna_v1.1", ONE, "<s>" + VICUNA_SYS + " USER: Hi ASSISTANT:"),
    ("vicuna_v1.1", SYS, "<s>Be brief. USER: Hi ASSISTANT:"),
    ("vicuna_v1.1", MULTI, "<s>" + VICUNA_SYS + " USER: Hi ASSISTANT: Hello!</s>USER: How are you? ASSISTANT:"),
    # guanaco: TheBloke/guanaco-*-GPTQ model cards, "### Human: {prompt}\n### Assistant:"
    ("guanaco", ONE, "<s>### Human: Hi\n### Assistant:"),
    ("guanaco", SYS, "<s>Be brief.\n### Human: Hi\n### Assistant:"),
    ("guanaco", MULTI, "<s>### Human: Hi\n### Assistant: Hello!\n### Human: How are you?\n### Assistant:"),
    # llama-2-chat: Meta's reference, and the official meta-llama/Llama-2-*-chat-hf template below
    ("llama-2-chat", ONE, "<s>[INST] Hi [/INST]"),
    ("llama-2-chat", SYS, "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"),
    ("llama-2-chat", MULTI, "<s>[INST] Hi [/INST] Hello! </s><s>[INST] How are you? [/INST]"),
    # alpaca: Stanford Alpaca's prompt_no_input
    ("alpaca", ONE, "<s>" + ALPACA_SYS + "\n\n### Instruction:\nHi\n\n### Response:\n"),
    ("alpaca", SYS, "<s>Be brief.\n\n### Instruction:\nHi\n\n### Response:\n"),
    (
        "alpaca",
        MULTI,
        "<s>" + ALPACA_SYS + "\n\n### Instruction:\nHi\n\n### Response:\nHello!\n\n"
        "### Instruction:\nHow are you?\n\n### Response:\n",
    ),
    # chatml
    ("chatml", ONE, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    ("chatml", SYS, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    (
        "chatml",
        MULTI,
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n",
    ),
]


@pytest.mark.parametrize("name,messages,expected", GOLDEN)
def test_fallback_golden(name, messages, expected):
    assert T.get(name).render(messages) == expected
    assert T.render(T.get(name), messages) == expected


@pytest.mark.parametrize(
    "name,expected",
    [
        ("vicuna_v1.1", "<s>" + VICUNA_SYS + " USER: Hi ASSISTANT: Hello!</s>"),
        ("chatml", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"),
        ("llama-2-chat", "<s>[INST] Hi [/INST] Hello! </s>"),
    ],
)
def test_no_generation_prompt(name, expected):
    assert T.get(name).render(MULTI[:2], add_generation_prompt=False) == expected


@pytest.mark.parametrize(
    "name,stop",
    [
        ("vicuna_v1.1", ("USER:", "</s>")),
        ("guanaco", ("### Human:",)),
        ("llama-2-chat", ("[INST]",)),
        ("alpaca", ("### Instruction:",)),
        ("chatml", ("<|im_end|>",)),
    ],
)
def test_stop_strings(name, stop):
    assert T.get(name).stop == stop


def test_special_tokens_override_the_bound_ones():
    assert T.get("llama-2-chat").render(ONE, bos_token="<BOS>") == "<BOS>[INST] Hi [/INST]"
    assert T.render(T.get("guanaco"), ONE, special_tokens={"bos_token": ""}) == "### Human: Hi\n### Assistant:"


def test_get_returns_a_copy_and_unknown_names_are_listed():
    copy = T.get("chatml")
    assert copy == T.FALLBACKS["chatml"] and copy is not T.FALLBACKS["chatml"]
    with pytest.raises(LowbitError, match=r"unknown chat template 'nope'; known: vicuna_v1.1, guanaco, ") as e:
        T.get("nope")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "messages,match",
    [
        ([], "at least one message"),
        ([{"role": "tool", "content": "x"}], "role must be one of system, user, assistant, got 'tool'"),
        ([{"content": "x"}], "got None"),
        ([{"role": "user"}], r"message 0 \(user\): content must be a string"),
        ([{"role": "user", "content": None}], "content must be a string"),
        (["hello"], "role must be one of"),
    ],
)
def test_bad_messages(messages, match):
    with pytest.raises(LowbitError, match=match):
        T.get("chatml").render(messages)


# ---- the model's own template, against transformers.apply_chat_template ----

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# tokenizer_config.json of meta-llama/Llama-2-13b-chat-hf (as quoted in EricLBuehler/mistral.rs
# mistralrs-core/src/pipeline/chat_template.rs tests); "\\n" is a Jinja escape, as in the JSON file.
LLAMA2_OFFICIAL = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

LLAMA_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
SMOLLM2_TOKENS = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>"}

CHATS = [
    ONE,
    SYS,
    MULTI,
    [
        {"role": "system", "content": "  You are a pirate.  "},
        {"role": "user", "content": "  Hello \n"},
        {"role": "assistant", "content": "   Arr   "},
        {"role": "user", "content": "Who are you?"},
    ],
]


def hf_tokenizer(chat_template, tokens):
    vocab = {t: i for i, t in enumerate(["[UNK]", *tokens.values(), "Hi"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **tokens)
    tok.chat_template = chat_template
    return tok


def hf_render(tok, messages, add_generation_prompt=True):
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("source,tokens", [(SMOLLM2, SMOLLM2_TOKENS), (LLAMA2_OFFICIAL, LLAMA_TOKENS)])
@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_model_template_matches_transformers(source, tokens, messages, add_generation_prompt):
    tok = hf_tokenizer(source, tokens)
    ours = T.from_tokenizer_config(source, tok.special_tokens_map)
    assert ours.render(messages, add_generation_prompt) == hf_render(tok, messages, add_generation_prompt)
    assert ours.stop == (tokens["eos_token"],)


def test_smollm2_golden():
    ours = T.from_tokenizer_config(SMOLLM2, SMOLLM2_TOKENS)
    assert ours.render(ONE) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("messages", CHATS)
def test_llama2_fallback_equals_official_template(messages):
    official = hf_render(hf_tokenizer(LLAMA2_OFFICIAL, LLAMA_TOKENS), messages)
    assert T.get("llama-2-chat").render(messages) == official


@pytest.mark.parametrize("name", sorted(T.FALLBACKS))
@pytest.mark.parametrize("messages", [SYS, MULTI])
def test_fallback_sources_render_the_same_in_transformers(name, messages):
    """Our sandbox is transformers' sandbox: each fallback's source gives the same text through HF."""
    fallback = T.get(name)
    tokens = dict(fallback.special_tokens) or SMOLLM2_TOKENS
    tok = hf_tokenizer(fallback.source, tokens)
    explicit = messages if messages[0]["role"] == "system" or fallback.default_system is None else (
        [{"role": "system", "content": fallback.default_system}, *messages]
    )
    assert fallback.render(messages) == hf_render(tok, explicit)


def test_raise_exception_becomes_lowbit_error():
    ours = T.from_tokenizer_config(LLAMA2_OFFICIAL, LLAMA_TOKENS)
    with pytest.raises(LowbitError, match=r"^chat template 'model': Conversation roles must alternate user/"):
        ours.render([{"role": "assistant", "content": "Hi"}])


def test_from_tokenizer_config_fallback_and_errors():
    raw = {"bos_token": {"__type": "AddedToken", "content": "<s>"}, "eos_token": "<|end|>", "pad_token": None}
    vicuna = T.from_tokenizer_config(None, raw, fallback="vicuna_v1.1")
    assert vicuna.stop == ("USER:", "</s>", "<|end|>")
    answered = SYS + [{"role": "assistant", "content": "Ok"}]
    assert vicuna.render(answered, add_generation_prompt=False) == "<s>Be brief. USER: Hi ASSISTANT: Ok<|end|>"
    named = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": SMOLLM2}]
    assert T.from_tokenizer_config(named, SMOLLM2_TOKENS).source == SMOLLM2
    with pytest.raises(LowbitError, match="no chat_template; pick a fallback: vicuna_v1.1, "):
        T.from_tokenizer_config("", LLAMA_TOKENS)
    with pytest.raises(LowbitError, match="unknown chat template"):
        T.from_tokenizer_config(None, LLAMA_TOKENS, fallback="vicuna")


# ---- the sandbox ----


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__ }}",
        "{{ raise_exception.__globals__ }}",
        "{{ messages.append({'role': 'user', 'content': 'x'}) }}",
        "{% set ns = namespace(__class__=1) %}",
        "{% for m in messages %}",  # does not compile
        "{{ cycler.__init__.__globals__.os }}",
    ],
)
def test_sandbox_blocks_misuse(source):
    with pytest.raises(LowbitError, match=r"^chat template 'evil': "):
        T.ChatTemplate("evil", source).render(ONE)


def test_hf_globals_and_filters():
    src = (
        "{{ messages | tojson }}|{{ strftime_now('%Y') | length }}|{% set ns = namespace(n=0) %}"
        "{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}{% endfor %}"
        "{{ ns.n }}|{% generation %}{{ eos_token }}{% endgeneration %}"
    )
    out = T.ChatTemplate("g", src).render([{"role": "user", "content": "é<b>"}] * 2, eos_token="</s>")
    assert out == '[{"role": "user", "content": "é<b>"}, {"role": "user", "content": "é<b>"}]|4|1|</s>'


def test_compiled_templates_are_cached():
    T._compile.cache_clear()
    T.get("chatml").render(ONE)
    T.get("chatml").render(MULTI)
    assert T._compile.cache_info().hits >= 1 and T._compile.cache_info().currsize == 1
