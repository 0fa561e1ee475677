"""The shipped BPE tokenizer: reproducible from the shipped corpus, exact round trips, EOS handling."""

from __future__ import annotations

import hashlib

import pytest

from cfnode.model.data import load_shakespeare
from cfnode.model.tokenizer import (
    EOS_TOKEN,
    TOKENIZER_PATH,
    TOKENIZER_SHA256,
    VOCAB_SIZE,
    eos_id,
    load_tokenizer,
    tokenizer_hash,
    tokenizer_json,
    train_tokenizer,
)


def test_shipped_file_matches_constant() -> None:
    assert hashlib.sha256(TOKENIZER_PATH.read_bytes()).hexdigest() == TOKENIZER_SHA256
    assert tokenizer_hash(load_tokenizer()) == TOKENIZER_SHA256


def test_load_tokenizer_is_cached() -> None:
    assert load_tokenizer() is load_tokenizer()


def test_retraining_on_training_works_reproduces_shipped_file() -> None:
    tok = train_tokenizer(load_shakespeare().train_docs, VOCAB_SIZE)
    assert tokenizer_json(tok).encode("utf-8") == TOKENIZER_PATH.read_bytes()
    assert tokenizer_hash(tok) == TOKENIZER_SHA256


def test_training_twice_gives_identical_json() -> None:
    docs = [doc[:20_000] for doc in load_shakespeare().train_docs[:6]]
    first, second = train_tokenizer(docs, 600), train_tokenizer(docs, 600)
    assert tokenizer_json(first) == tokenizer_json(second)
    assert first.get_vocab_size() == 600


def test_vocab_size_and_eos() -> None:
    tok = load_tokenizer()
    assert tok.get_vocab_size() == VOCAB_SIZE == 4096
    assert eos_id() == tok.token_to_id(EOS_TOKEN) == 0
    assert tok.id_to_token(eos_id()) == EOS_TOKEN
    assert EOS_TOKEN == "<|endoftext|>"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "To be, or not to be: that is the question:\n",
        "  leading spaces,\ttabs\r\nCRLF, trailing spaces   \n\n\n",
        "naïve café — “quoted” 日本語 🎭 \x00\x7f",
    ],
)
def test_exact_round_trip(text: str) -> None:
    tok = load_tokenizer()
    encoding = tok.encode(text, add_special_tokens=False)
    assert all(0 <= i < VOCAB_SIZE for i in encoding.ids)
    assert tok.decode(encoding.ids, skip_special_tokens=False) == text


def test_round_trip_of_held_out_work() -> None:
    tok = load_tokenizer()
    tempest = load_shakespeare().val_docs[-1][:50_000]
    ids = tok.encode(tempest, add_special_tokens=False).ids
    assert tok.decode(ids) == tempest
    assert len(ids) < len(tempest) / 2.5  # the merges actually compress English verse
    assert eos_id() not in ids


def test_encode_adds_no_special_tokens() -> None:
    tok = load_tokenizer()
    assert eos_id() not in tok.encode("Exeunt.").ids
    assert tok.decode([*tok.encode("Exeunt.").ids, eos_id()], skip_special_tokens=False) == "Exeunt." + EOS_TOKEN
