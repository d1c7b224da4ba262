"""Tokenizer wrapper and streaming detokenizer, on two tokenizers built in code (no Hub).

`byte_level`: GPT-2 / SmolLM2 style byte-level BPE. `llama_like`: LLaMA style BPE over "▁" with byte
fallback and LLaMA's decoder (Replace, ByteFallback, Fuse, Strip), adding <s> like LLaMA does.
"""

import json
import random

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lowbit.errors import LowbitError
from lowbit.model.tokenizer import StreamDecoder, Tokenizer

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Héllo wörld, naïve café, résumé, Ångström, façade.",
    "  Spaces  and\ttabs,\nnew lines; numbers 12345 and symbols #$%&*.",
    "def f(x):\n    return x ** 2  # code",
] * 20
EXOTIC = "你好世界こんにちは🙂🎉👍🏽€—“”ßéàüñ"  # mostly not in either vocab: byte tokens
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


def byte_level_raw() -> RawTokenizer:
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    )
    raw.train_from_iterator(CORPUS, trainer)
    return raw


def llama_like_raw() -> RawTokenizer:
    """Train merges on the corpus, then rebuild with <unk> <s> </s> and the 256 byte tokens first, as LLaMA."""
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    scratch = RawTokenizer(models.BPE())
    scratch.pre_tokenizer = metaspace
    scratch.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, limit_alphabet=60))
    trained = json.loads(scratch.to_str())["model"]
    vocab = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    vocab += [t for t in trained["vocab"] if t not in vocab]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    raw = RawTokenizer(
        models.BPE({t: i for i, t in enumerate(vocab)}, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    raw.pre_tokenizer = metaspace
    raw.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    raw.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return raw


def save(raw: RawTokenizer, folder, generation_config: dict | None = None, **special) -> Tokenizer:
    PreTrainedTokenizerFast(tokenizer_object=raw, **special).save_pretrained(folder)
    if generation_config is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation_config))
    return Tokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory) -> Tokenizer:
    return save(
        byte_level_raw(),
        tmp_path_factory.mktemp("byte_level"),
        {"eos_token_id": [2, 0]},
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=TEMPLATE,
    )


@pytest.fixture(scope="module")
def llama_like(tmp_path_factory) -> Tokenizer:
    return save(
        llama_like_raw(),
        tmp_path_factory.mktemp("llama_like"),
        {"eos_token_id": 2},
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


@pytest.fixture(params=["byte_level", "llama_like"])
def tok(request) -> Tokenizer:
    return request.getfixturevalue(request.param)


def stream(tok: Tokenizer, ids, context=()) -> list[str]:
    decoder = StreamDecoder(tok, context)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def random_text(rng: random.Random) -> str:
    pieces = ["Hello", "world", "café", " ", "  ", "\n", "the", "naïve", ".", ",", "x", "12"] + list(EXOTIC)
    text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 25)))
    return (" " * rng.randint(0, 2)) + text


def test_metadata(byte_level, llama_like):
    assert byte_level.eos_ids == (2, 0)  # the tokenizer's <|im_end|>, then generation_config's list
    assert llama_like.eos_ids == (2,)  # an int in generation_config.json, no repeat
    assert byte_level.special_tokens == {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
    }
    assert llama_like.special_tokens == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    assert byte_level.chat_template == TEMPLATE and llama_like.chat_template is None
    assert llama_like.bos_id == 1 and llama_like.vocab_size == len(llama_like.hf) >= 259


def test_encode_respects_tokenizer_bos(byte_level, llama_like):
    assert llama_like.encode("Hello world")[0] == 1
    assert llama_like.encode("Hello world", add_bos=False)[0] != 1
    assert (
        llama_like.encode("<s>Hello")
        == llama_like.encode("Hello", add_bos=True)[:1] + llama_like.encode("<s>Hello", add_bos=False)[1:]
    )
    assert llama_like.encode("<s>Hello").count(1) == 1
    assert byte_level.encode("Hello") == byte_level.encode("Hello", add_bos=False)  # adds no BOS of its own


def test_roundtrip_and_byte_fallback(llama_like):
    text = "Hello 🙂 world 你好"
    ids = llama_like.encode(text, add_bos=False)
    assert llama_like.decode(ids) == text
    assert any(llama_like.hf.convert_ids_to_tokens(i).startswith("<0x") for i in ids)


@pytest.mark.parametrize("seed", range(3))
def test_stream_joins_to_decode(tok, seed):
    rng = random.Random(seed)
    for _ in range(120):
        text = random_text(rng)
        ids = tok.encode(text)
        deltas = stream(tok, ids)
        assert "".join(deltas) == tok.decode(ids), text
        if "\ufffd" not in tok.decode(ids):
            assert not any("\ufffd" in d for d in deltas), text


def test_stream_holds_back_split_characters(llama_like):
    ids = llama_like.encode("a€b", add_bos=False)
    pieces = llama_like.hf.convert_ids_to_tokens(ids)
    assert ["<0xE2>", "<0x82>", "<0xAC>"] == pieces[-4:-1]
    deltas = stream(llama_like, ids)
    assert deltas[-5:] == ["", "", "€", "b", ""]


def test_stream_keeps_leading_spaces(llama_like):
    ids = llama_like.encode("Hello world  again", add_bos=False)
    deltas = [d for d in stream(llama_like, ids) if d]
    assert "".join(deltas) == "Hello world  again"
    assert any(d.startswith(" ") for d in deltas[1:])
    single = [llama_like.decode([i]) for i in ids]
    assert "".join(single) != "Hello world  again"  # token-by-token decode loses them: the classic bug


def test_stream_skips_special_tokens_and_uses_context(tok):
    eos = tok.eos_ids[0]
    ids = tok.encode("Hi there", add_bos=True) + [eos] * 20 + tok.encode(" again", add_bos=False) + [eos]
    assert "".join(stream(tok, ids)) == tok.decode(ids) == "Hi there again"
    prompt, out = tok.encode("The answer is"), tok.encode(" 42 café", add_bos=False)
    text = "".join(stream(tok, out, context=prompt))
    assert text == tok.decode(prompt + out)[len(tok.decode(prompt)) :]


def test_stream_window_stays_bounded(byte_level):
    decoder = StreamDecoder(byte_level)
    for i in byte_level.encode("word " * 200):
        decoder.push(i)
        assert len(decoder._ids) <= 4


def test_missing_folder_raises(tmp_path):
    with pytest.raises(LowbitError):
        Tokenizer.from_pretrained(tmp_path / "nope")
