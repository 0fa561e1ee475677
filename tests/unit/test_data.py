"""Corpora, the held-out split, the token cache and the (seed, step) -> microbatch function."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import os
import sys
import zlib
from pathlib import Path

import pytest
import torch

from cfnode.errors import ConfigError
from cfnode.model import data
from cfnode.model.data import (
    CORPUS_PATH,
    CORPUS_SHA256,
    CORPUS_TEXT_SHA256,
    HELDOUT_WORKS,
    Corpus,
    TokenData,
    batch_for_step,
    load_corpus,
    pack_works,
    shakespeare_works,
    unpack_works,
    validation_batches,
)
from cfnode.model.tokenizer import EOS_TOKEN, load_tokenizer

# --------------------------------------------------------------------------------------------- corpus


def test_corpus_file_matches_constants() -> None:
    blob = CORPUS_PATH.read_bytes()
    assert hashlib.sha256(blob).hexdigest() == CORPUS_SHA256
    assert hashlib.sha256(gzip.decompress(blob)).hexdigest() == CORPUS_TEXT_SHA256
    assert 1_500_000 < len(blob) < 2_500_000
    assert (CORPUS_PATH.parent / "NOTICE").is_file()


def test_corpus_has_42_works_in_sorted_order() -> None:
    works = shakespeare_works()
    names = [name for name, _ in works]
    assert len(works) == 42
    assert names == sorted(set(names))
    assert {"hamlet", "sonnets", "tempest", "winters_tale"} <= set(names)
    assert all(len(text) > 1000 for _, text in works)
    hamlet = dict(works)["hamlet"]
    assert "To be, or not to be" in hamlet


def test_pack_unpack_round_trip_and_reproducible() -> None:
    works = [("a", "plain\n"), ("b", ""), ("c", "\n@@ fake 3\nxyz\n"), ("d", "ünïcødé 🎭")]
    blob = pack_works(works)
    assert blob == pack_works(works)  # gzip with mtime 0: byte-identical
    assert unpack_works(gzip.decompress(blob)) == works


def test_shipped_corpus_repacks_to_the_same_bytes() -> None:
    assert pack_works(shakespeare_works()) == CORPUS_PATH.read_bytes(), (
        f"same text, different gzip bytes: zlib {zlib.ZLIB_RUNTIME_VERSION} compresses differently from the "
        "zlib 1.2.13 that wrote the shipped file"
    )


def test_held_out_works_absent_from_training() -> None:
    works = dict(shakespeare_works())
    corpus = load_corpus(None)
    assert corpus.name == "shakespeare"
    assert corpus.val_docs == tuple(works[name] for name in sorted(HELDOUT_WORKS))
    assert len(corpus.train_docs) + len(corpus.val_docs) == 42
    assert set(HELDOUT_WORKS) == {"sonnets", "tempest"}
    train_text = "\n".join(corpus.train_docs)
    for doc in corpus.val_docs:
        assert doc not in corpus.train_docs
        for start in (len(doc) // 4, len(doc) // 2, 3 * len(doc) // 4):  # distinctive passages of each work
            assert doc[start:start + 300] not in train_text
    assert "Full fathom five thy father lies" not in train_text
    assert "Shall I compare thee to a summer's day?" not in train_text


def test_corpus_content_hash() -> None:
    a = Corpus(train_docs=("x", "y"), val_docs=("z",), name="a")
    assert a.content_hash == Corpus(train_docs=("x", "y"), val_docs=("z",), name="other").content_hash
    assert a.content_hash != Corpus(train_docs=("x",), val_docs=("y", "z"), name="a").content_hash
    assert a.content_hash != Corpus(train_docs=("xy",), val_docs=("z",), name="a").content_hash


# --------------------------------------------------------------------------------------------- other sources


@pytest.fixture
def offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_corpus forces HF offline mode in os.environ; restore the caller's environment afterwards."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, os.environ.get(var, "0"))


@pytest.fixture
def text_dir(tmp_path: Path) -> Path:
    for i in range(4):
        (tmp_path / f"doc{i}.txt").write_text(f"Document {i}.\nIt has two lines.\n")
    (tmp_path / "ignored.md").write_text("not a txt file")
    return tmp_path


def test_load_local_directory(text_dir: Path, offline_env: None) -> None:
    corpus = load_corpus(str(text_dir))
    assert corpus.name == str(text_dir)
    assert corpus.train_docs == tuple(f"Document {i}.\nIt has two lines.\n" for i in range(3))
    assert corpus.val_docs == ("Document 3.\nIt has two lines.\n",)


def test_load_local_glob_and_file(text_dir: Path, offline_env: None) -> None:
    corpus = load_corpus(str(text_dir / "doc[12].txt"))
    assert corpus.train_docs == ("Document 1.\nIt has two lines.\n",)
    assert corpus.val_docs == ("Document 2.\nIt has two lines.\n",)

    single = text_dir / "long.txt"
    text = "".join(f"line {i}\n" for i in range(200))
    single.write_text(text)
    corpus = load_corpus(str(single))
    (train,), (val,) = corpus.train_docs, corpus.val_docs
    assert train + val == text
    assert len(val) == len(text) - int(len(text) * 0.95)


@pytest.mark.parametrize("source", ["/definitely/not/here.txt", "./missing-dir/", "nope/*.txt"])
def test_missing_path_raises_config_error(source: str, offline_env: None) -> None:
    with pytest.raises(ConfigError, match=source.replace("*", r"\*").replace(".", r"\.")):
        load_corpus(source)


def test_empty_directory_raises_config_error(tmp_path: Path, offline_env: None) -> None:
    with pytest.raises(ConfigError, match=r"without \*\.txt"):
        load_corpus(str(tmp_path))


@pytest.mark.parametrize("name", ["cfnode-no-such-dataset-xyz", "nobody/cfnode-no-such-dataset"])
def test_unknown_dataset_name_raises_config_error(name: str, offline_env: None) -> None:
    with pytest.raises(ConfigError, match=name):
        load_corpus(name)
    assert os.environ["HF_DATASETS_OFFLINE"] == os.environ["HF_HUB_OFFLINE"] == "1"


def test_named_dataset_splits(monkeypatch: pytest.MonkeyPatch, offline_env: None) -> None:
    import datasets

    calls: list[str] = []

    def fake_load_dataset(name: str) -> datasets.DatasetDict:
        calls.append(name)
        assert os.environ["HF_HUB_OFFLINE"] == "1"
        splits = {"train": datasets.Dataset.from_dict({"id": list(range(40)), "text": [f"t{i}" for i in range(40)]})}
        if name == "with-val":
            splits["validation"] = datasets.Dataset.from_dict({"text": ["v0", "", "v1"]})
        return datasets.DatasetDict(splits)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    corpus = load_corpus("with-val")
    assert corpus.train_docs == tuple(f"t{i}" for i in range(40)) and corpus.val_docs == ("v0", "v1")
    corpus = load_corpus("no-val")
    assert corpus.train_docs == tuple(f"t{i}" for i in range(38))
    assert corpus.val_docs == ("t38", "t39")
    assert calls == ["with-val", "no-val"]


# --------------------------------------------------------------------------------------------- tokens


SMALL = Corpus(train_docs=("To be, or not to be.", "Exeunt."), val_docs=("Enter Prospero.",), name="small")


def test_token_data_layout(tmp_path: Path) -> None:
    tok = load_tokenizer()
    eos = tok.token_to_id(EOS_TOKEN)
    tokens = TokenData.from_corpus(SMALL, tok, cache_dir=tmp_path)
    expected_train = [*tok.encode(SMALL.train_docs[0]).ids, eos, *tok.encode(SMALL.train_docs[1]).ids, eos]
    assert tokens.train.dtype == tokens.val.dtype == torch.int64
    assert tokens.train.tolist() == expected_train
    assert tokens.val.tolist() == [*tok.encode(SMALL.val_docs[0]).ids, eos]


def test_token_cache_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = load_tokenizer()
    first = TokenData.from_corpus(SMALL, tok, cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [f"tokens-{first.key[:32]}.pt"]  # no tmp file left over

    def fail(*args: object) -> None:
        raise AssertionError("encoded although cached")

    monkeypatch.setattr(data, "_encode", fail)
    second = TokenData.from_corpus(SMALL, tok, cache_dir=tmp_path)
    assert second.key == first.key
    assert torch.equal(second.train, first.train) and torch.equal(second.val, first.val)
    assert second.train.dtype == torch.int64
    other = Corpus(train_docs=SMALL.train_docs, val_docs=("Exit.",), name="small")
    with pytest.raises(AssertionError, match="encoded although cached"):
        TokenData.from_corpus(other, tok, cache_dir=tmp_path)


def test_token_cache_defaults_to_xdg_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    tokens = TokenData.from_corpus(SMALL, load_tokenizer())
    assert (tmp_path / "cfnode" / f"tokens-{tokens.key[:32]}.pt").is_file()


def test_unwritable_or_corrupt_cache_falls_back(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    tok = load_tokenizer()
    tokens = TokenData.from_corpus(SMALL, tok, cache_dir=blocker)
    assert tokens.train.numel() > 0

    cache = tmp_path / "cache"
    key = TokenData.from_corpus(SMALL, tok, cache_dir=cache).key
    (cache / f"tokens-{key[:32]}.pt").write_bytes(b"garbage")
    assert torch.equal(TokenData.from_corpus(SMALL, tok, cache_dir=cache).train, tokens.train)


def test_shakespeare_tokens(tmp_path: Path) -> None:
    tok = load_tokenizer()
    corpus = load_corpus(None)
    tokens = TokenData.from_corpus(corpus, tok, cache_dir=tmp_path)
    eos = tok.token_to_id(EOS_TOKEN)
    assert int((tokens.train == eos).sum()) == len(corpus.train_docs)
    assert int((tokens.val == eos).sum()) == len(corpus.val_docs) == 2
    assert 1_000_000 < tokens.train.numel() < 2_500_000
    sonnets_end = int((tokens.val == eos).nonzero()[0])
    assert tok.decode(tokens.val[:sonnets_end].tolist()) == corpus.val_docs[0]


# --------------------------------------------------------------------------------------------- batches


TOKENS = torch.arange(10_000, dtype=torch.int64)
SHAPE = {"num_microbatches": 3, "microbatch_size": 4, "seq_len": 16}


def test_batch_for_step_shape_and_windows() -> None:
    batch = batch_for_step(TOKENS, seed=0, step=0, **SHAPE)
    assert batch.shape == (3, 4, 17) and batch.dtype == torch.int64
    inputs, targets = batch[..., :-1], batch[..., 1:]
    assert torch.equal(targets, inputs + 1)  # contiguous windows: targets are inputs shifted by one
    assert int(batch.min()) >= 0 and int(batch.max()) < TOKENS.numel()


def test_batch_for_step_is_a_pure_function_of_seed_and_step() -> None:
    a = batch_for_step(TOKENS, seed=7, step=3, **SHAPE)
    torch.manual_seed(12345)  # the global RNG is irrelevant
    torch.rand(100)
    assert torch.equal(a, batch_for_step(TOKENS, seed=7, step=3, **SHAPE))
    assert torch.equal(a, batch_for_step(TOKENS.clone().to(torch.int32), seed=7, step=3, **SHAPE))
    assert not torch.equal(a, batch_for_step(TOKENS, seed=7, step=4, **SHAPE))
    assert not torch.equal(a, batch_for_step(TOKENS, seed=8, step=3, **SHAPE))
    assert data.step_seed(0, 1_000_003) != data.step_seed(1, 0)


def test_batch_for_step_same_across_processes() -> None:
    import subprocess

    code = (
        "import torch; from cfnode.model.data import batch_for_step; "
        "print(batch_for_step(torch.arange(10_000), seed=7, step=3, num_microbatches=3, microbatch_size=4, "
        "seq_len=16)[..., 0].flatten().tolist())"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == str(batch_for_step(TOKENS, seed=7, step=3, **SHAPE)[..., 0].flatten().tolist())


def test_too_few_tokens_raise_config_error() -> None:
    seq_len = 16
    short = torch.arange(seq_len + 1)
    with pytest.raises(ConfigError, match="seq_len"):
        batch_for_step(short, seed=0, step=0, num_microbatches=1, microbatch_size=1, seq_len=seq_len)
    with pytest.raises(ConfigError, match="seq_len"):
        validation_batches(short, num_batches=1, microbatch_size=1, seq_len=seq_len)
    just_enough = torch.arange(seq_len + 2)
    batch = batch_for_step(just_enough, seed=0, step=0, num_microbatches=2, microbatch_size=8, seq_len=seq_len)
    assert set(batch[..., 0].flatten().tolist()) <= {0, 1}


def test_validation_batches_deterministic_and_evenly_spaced() -> None:
    val = validation_batches(TOKENS, num_batches=2, microbatch_size=5, seq_len=16)
    assert val.shape == (2, 5, 17) and val.dtype == torch.int64
    assert torch.equal(val, validation_batches(TOKENS, num_batches=2, microbatch_size=5, seq_len=16))
    assert torch.equal(val[..., 1:], val[..., :-1] + 1)
    starts = val[..., 0].flatten().tolist()
    assert starts[0] == 0 and int(val[-1, -1, -1]) == TOKENS.numel() - 1
    gaps = {b - a for a, b in itertools.pairwise(starts)}
    assert max(gaps) - min(gaps) <= 1
