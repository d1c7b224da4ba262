"""Text sources (files, folders, globs, jsonl chats, parquet, the Hub's one-line errors) and token protocols.

The tokenizer is built in code: byte-level BPE without merges, so every UTF-8 byte is one token and
counts are exact; it adds <s> like LLaMA and carries a ChatML-style chat template.
"""

import builtins
import json
import sys
import types

import pytest
import torch
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from lowbit import data
from lowbit.errors import LowbitError
from lowbit.model.tokenizer import Tokenizer

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
ALTERNATIVE = "pass a local .txt/.jsonl/.parquet file instead"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(["<s>", "<|im_start|>", "<|im_end|>", *alphabet])}
    raw = RawTokenizer(models.BPE(vocab, []))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>",
                                 additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    hf.chat_template = TEMPLATE
    return Tokenizer(hf, ())


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


# ---- texts ----

def test_txt_folder_and_glob(tmp_path):
    assert data.load_texts(write(tmp_path / "a.txt", "alpha\nbeta\n")) == ["alpha\nbeta\n"]
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "b.txt", "gamma")
    write(tmp_path / "skip.md", "not read")
    assert data.load_texts(str(tmp_path)) == ["alpha\nbeta\n", "gamma"]  # sorted, recursive, .txt only
    assert data.load_texts(str(tmp_path / "**" / "*.txt")) == ["alpha\nbeta\n", "gamma"]


def test_jsonl_text_and_messages(tmp_path, tok):
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    lines = [json.dumps({"text": "plain"}), "", json.dumps(chat)]
    path = write(tmp_path / "d.jsonl", "\n".join(lines))
    assert data.load_texts(path, tokenizer=tok) == [
        "plain", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"]
    with pytest.raises(LowbitError, match=r"d.jsonl line 3: chat messages need a model's tokenizer"):
        data.load_texts(path)


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one", None, "two"], "id": [1, 2, 3]}), tmp_path / "d.parquet")
    assert data.load_texts(str(tmp_path / "d.parquet")) == ["one", "two"]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "e.parquet")
    with pytest.raises(LowbitError, match=r"e.parquet: no `text` column \(columns: body\)"):
        data.load_texts(str(tmp_path / "e.parquet"))


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", "  \n", r"empty.txt: no text found$"),
    ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', r"bad.jsonl line 2: not valid JSON"),
    ("shape.jsonl", '{"text": "ok"}\n[1, 2]\n', r'shape.jsonl line 2: expected a JSON object with a "text"'),
    ("role.jsonl", '{"messages": [{"role": "tool", "content": "x"}]}\n', r"role.jsonl line 1: message 0: role"),
    ("data.csv", "a,b\n", r"data.csv: unsupported file type"),
])
def test_file_errors(tmp_path, tok, name, content, message):
    with pytest.raises(LowbitError, match=message) as e:
        data.load_texts(write(tmp_path / name, content), tokenizer=tok)
    assert "\n" not in str(e.value)


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(LowbitError, match="nope.txt: no such file or folder"):
        data.load_texts(str(tmp_path / "nope.txt"))
    with pytest.raises(LowbitError, match="no text found"):
        data.load_texts(str(tmp_path))


def test_hub_without_datasets_package(monkeypatch):
    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "datasets", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(LowbitError) as e:
        data.load_texts("wikitext2", "test")
    assert str(e.value) == f"wikitext2 needs the `datasets` package and access to the Hugging Face Hub; {ALTERNATIVE}"


class FakeDataset:
    def __init__(self, texts):
        self.texts = texts

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, rows):
        return {"text": self.texts[rows]}


def fake_datasets(monkeypatch, load_dataset):
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


def test_hub_unreachable(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)\nmore detail")

    fake_datasets(monkeypatch, offline)
    with pytest.raises(LowbitError, match=f"Hub \\(ConnectionError: Couldn't reach .*\\); {ALTERNATIVE}$") as e:
        data.load_texts("c4", "validation")
    assert "\n" not in str(e.value)


def test_hub_calls_follow_the_gptq_paper(monkeypatch):
    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return FakeDataset([f"doc {i}" for i in range(1500)])

    fake_datasets(monkeypatch, load_dataset)
    assert len(data.load_texts("wikitext2", "test")) == 1500
    assert data.load_texts("c4", "validation")[-1] == "doc 1099"  # the paper's first 1100 documents
    assert calls == [(("wikitext", "wikitext-2-raw-v1"), {"split": "test"}),
                     (("allenai/c4",), {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
                                        "split": "validation"})]
    with pytest.raises(LowbitError, match="c4 has no split 'test'"):
        data.load_texts("c4", "test")


def test_python_docs_split(tmp_path):
    for rel, text in {"library/os.rst.txt": "os", "library/b/x.rst.txt": "x", "reference/expr.rst.txt": "e",
                      "tutorial/t.rst.txt": "t"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        write(tmp_path / rel, text)
    assert data.python_docs_split(tmp_path) == (["x", "os"], ["e"])  # sorted by path: library/b/ < library/os
    with pytest.raises(LowbitError, match="install the Debian package python3.11-doc"):
        data.python_docs_split(tmp_path / "absent")


# ---- token tensors ----

def test_calibration_windows(tok):
    texts = ["abcdefghij" * 5, "KLMNOPQRST" * 5]  # 50 + 2 + 50 bytes = 102 tokens, no BOS
    stream = torch.tensor(tok.encode("\n\n".join(texts), add_bos=False))
    windows = data.calibration_windows(tok, texts, nsamples=8, seqlen=16, seed=3)
    assert windows.shape == (8, 16) and windows.dtype == torch.long
    assert torch.equal(windows, data.calibration_windows(tok, texts, nsamples=8, seqlen=16, seed=3))
    assert not torch.equal(windows, data.calibration_windows(tok, texts, nsamples=8, seqlen=16, seed=4))
    for w in windows:  # each window is a contiguous slice of the stream, BOS nowhere
        starts = [i for i in range(len(stream) - 15) if torch.equal(stream[i : i + 16], w)]
        assert starts and 0 not in w.tolist()
    assert data.calibration_windows(tok, texts, nsamples=2, seqlen=101).shape == (2, 101)
    with pytest.raises(LowbitError, match="calibration text has 102 tokens; windows of seqlen 102 need at least 103"):
        data.calibration_windows(tok, texts, nsamples=2, seqlen=102)


def test_eval_tokens(tok):
    tokens = data.eval_tokens(tok, ["ab", "c"])
    assert tokens.tolist() == [[0, *tok.encode("ab\n\nc", add_bos=False)]] and len(tokens[0]) == 6
    assert data.eval_tokens(tok, ["ab"], add_bos=False).shape == (1, 2)


def test_encode_long_equals_encode(tok, prose):
    text = prose[:20000]
    assert data.encode_long(tok, text, add_bos=True) == tok.encode(text, add_bos=True)
