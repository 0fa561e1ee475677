"""The shipped byte-level BPE tokenizer: how it is trained, where it lives, and how it is loaded.

The tokenizer (`tokenizer/shakespeare-bpe-4096.json`) is a 4096-token byte-level BPE trained with HF `tokenizers` on
the *training* works of the embedded Shakespeare corpus only (the held-out works of `cfnode.model.data` never reach
the trainer). It has exactly one special token, `EOS_TOKEN`, which separates documents in the token stream; no
token is added automatically when encoding. Byte-level pre-tokenization without a prefix space makes
`decode(encode(text)) == text` exactly, for any text.

Training is deterministic: with the full byte alphabet as the initial alphabet every symbol id is fixed before
any word is counted, and merge ties are broken by pair ids, so the result does not depend on hash-map iteration
order or on how many threads count words (checked: identical JSON with 1, 2, 8 and 16 rayon threads, with
`TOKENIZERS_PARALLELISM=false` and under different `PYTHONHASHSEED`s), so no thread setting is forced here.
`scripts/make_corpus.py` regenerates the shipped file and checks it against
`TOKENIZER_SHA256`; a `tokenizers` release that changes the JSON layout changes that hash, not the encodings.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 4096
TOKENIZER_PATH = Path(__file__).resolve().parent / "tokenizer" / "shakespeare-bpe-4096.json"
TOKENIZER_SHA256 = "d750d90db8648b86eced012e2c081a210bcebfe6386d122389f4e1f2dd041f0f"
"""sha256 of the bytes of `TOKENIZER_PATH` (= `tokenizer_json(load_tokenizer())` encoded as UTF-8)."""

_tokenizer: Tokenizer | None = None
_lock = threading.Lock()


def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train a byte-level BPE on `texts` (each item one document) deterministically.

    The vocabulary holds `EOS_TOKEN` (id 0), the 256 byte symbols and `vocab_size - 257` merges (fewer if the
    texts run out of pairs seen at least twice).
    """
    if vocab_size < 258:
        raise ValueError(f"vocab_size must be >= 258 (1 special + 256 bytes + 1 merge), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    docs = list(texts)
    tokenizer.train_from_iterator(docs, trainer=trainer, length=len(docs))
    log.debug("trained BPE tokenizer: %d docs, vocab %d", len(docs), tokenizer.get_vocab_size())
    return tokenizer


def tokenizer_json(tokenizer: Tokenizer) -> str:
    """The canonical serialization of `tokenizer` (what the shipped file holds)."""
    return tokenizer.to_str(pretty=True)


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    """sha256 hex digest of `tokenizer_json(tokenizer)`; identifies a tokenizer in cache keys."""
    return hashlib.sha256(tokenizer_json(tokenizer).encode("utf-8")).hexdigest()


def load_tokenizer() -> Tokenizer:
    """The shipped tokenizer, loaded once per process and verified against `TOKENIZER_SHA256`."""
    global _tokenizer
    with _lock:
        if _tokenizer is None:
            blob = TOKENIZER_PATH.read_bytes()
            digest = hashlib.sha256(blob).hexdigest()
            if digest != TOKENIZER_SHA256:
                raise RuntimeError(
                    f"shipped tokenizer {TOKENIZER_PATH} has sha256 {digest}, expected {TOKENIZER_SHA256}; "
                    "the installation is corrupt (regenerate with scripts/make_corpus.py)"
                )
            _tokenizer = Tokenizer.from_str(blob.decode("utf-8"))
        return _tokenizer


def eos_id() -> int:
    """Id of `EOS_TOKEN` in the shipped tokenizer."""
    token_id = load_tokenizer().token_to_id(EOS_TOKEN)
    if token_id is None:  # pragma: no cover - guarded by the sha256 check
        raise RuntimeError(f"shipped tokenizer has no {EOS_TOKEN!r} token")
    return token_id
