"""Incremental detokenization: streamed pieces concatenate to exactly the full decode, with a byte-level BPE
tokenizer (multi-byte characters split across tokens) and a Llama-style Metaspace one (leading-space marker,
which per-token decoding drops)."""
from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pagedllm.detokenizer import IncrementalDetokenizer

TEXT = ("Streaming text must keep its spaces: naïve détokenizers drop them. "
        "Emoji 🦊 and CJK 日本語 split across byte tokens too. ") * 4


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=[f"<0x{b:02X}>" for b in range(256)])
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def bytelevel_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


@pytest.mark.parametrize("make", [metaspace_tokenizer, bytelevel_tokenizer])
@pytest.mark.parametrize("step", [1, 3])
def test_pieces_concatenate_to_the_full_text(make, step):
    tok = make()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    full = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    detok = IncrementalDetokenizer(tok)
    pieces = []
    for i in range(0, len(ids), step):
        chunk = ids[i:i + step]
        pieces.append(detok.add(chunk, finished=i + step >= len(ids)))
    assert "".join(pieces) == full
    assert all("\ufffd" not in p for p in pieces)  # a split character waits for its last byte


def test_per_token_decoding_would_lose_spaces():
    """Why the detokenizer keeps state: decoding Metaspace tokens one by one drops the spaces."""
    tok = metaspace_tokenizer()
    ids = tok("keep its spaces", add_special_tokens=False)["input_ids"]
    naive = "".join(tok.decode([i]) for i in ids)
    assert naive != tok.decode(ids)
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.add([i], finished=k == len(ids) - 1) for k, i in enumerate(ids)) == tok.decode(
        ids, clean_up_tokenization_spaces=False)
