"""A tiny random chat model folder for engine and server tests: LLaMA weights plus a byte-level tokenizer.

Every UTF-8 byte is one token (byte-level BPE without merges), `<|im_end|>` is EOS, and the tokenizer
carries a ChatML template, so the folder loads with `lowbit.api.load` like a real chat model.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tests.conftest import tiny_config, write_hf_checkpoint

SPECIAL = ["<s>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tiny_chat_model(folder: Path, max_position_embeddings: int = 512, seed: int = 0) -> Path:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate([*SPECIAL, *alphabet])}
    raw = RawTokenizer(models.BPE(vocab, []))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="<|im_end|>",
                                 additional_special_tokens=["<|im_start|>"])
    hf.chat_template = CHATML
    cfg = tiny_config(vocab_size=len(vocab), max_position_embeddings=max_position_embeddings,
                      bos_token_id=0, eos_token_id=vocab["<|im_end|>"])
    write_hf_checkpoint(folder, cfg, seed=seed)
    hf.save_pretrained(folder)
    return folder
