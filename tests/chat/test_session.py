"""ChatSession on the real SmolLM2: history is recorded, trimmed to the context window, reset, and the
template's stop strings join the sampling parameters."""

import pytest

from lowbit.api import load
from lowbit.chat.session import ChatSession
from lowbit.engine.engine import Engine, EngineConfig
from lowbit.engine.sampling import SamplingParams
from lowbit.errors import LowbitError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loaded(smollm2_dir):
    return load(str(smollm2_dir), "cpu")


def session(loaded, max_seq_len=512, max_new_tokens=8, system=None):
    engine = Engine(loaded.model, loaded.tokenizer, EngineConfig(max_batch=1, max_seq_len=max_seq_len))
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    return ChatSession(engine, loaded.chat_template("chatml"), params, system=system)


def test_turns_are_recorded_and_rendered_in_order(loaded):
    chat = session(loaded, system="Be brief.")
    reply = "".join(chat.send("What is the capital of France?"))
    assert reply.strip() and chat.turns == [{"role": "user", "content": "What is the capital of France?"},
                                            {"role": "assistant", "content": reply.strip()}]
    text = loaded.tokenizer.hf.decode(chat.prompt_ids("And of Italy?"))
    assert text.index("Be brief.") < text.index("capital of France") < text.index(reply.strip()) < text.index("Italy")
    assert text.endswith("<|im_start|>assistant\n")


def test_template_stop_strings_join_the_sampling_params(loaded):
    chat = session(loaded)
    assert "<|im_end|>" in chat.params.stop


def test_history_is_trimmed_to_the_context_window(loaded):
    chat = session(loaded, max_seq_len=160, max_new_tokens=16)
    filler = "word " * 40
    for i in range(4):
        chat.turns += [{"role": "user", "content": f"{i} {filler}"}, {"role": "assistant", "content": "ok"}]
    ids = chat.prompt_ids("last question")
    assert len(ids) <= 160 - 16
    assert 0 < len(chat.turns) < 8 and chat.turns[-2]["content"].startswith("3 ")  # oldest dropped first


def test_a_message_longer_than_the_context_is_refused(loaded):
    chat = session(loaded, max_seq_len=64, max_new_tokens=16)
    with pytest.raises(LowbitError, match="too long"):
        chat.prompt_ids("word " * 200)


def test_reset_and_system(loaded):
    chat = session(loaded)
    chat.turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    chat.set_system("You are terse.")
    chat.reset()
    assert chat.turns == [] and chat.messages("hi")[0] == {"role": "system", "content": "You are terse."}
    chat.set_system("")
    assert chat.messages("hi") == [{"role": "user", "content": "hi"}]
