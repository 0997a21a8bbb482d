"""Data pipeline: preparation into shards, memory-mapped blocks, caching keyed by inputs, and
clear refusals of bad files."""

import json

import numpy as np
import pytest

from treeffn.data.datamodule import TextDataModule, concat_documents, pack_blocks, unigram_perplexity
from treeffn.data.sources import DataError, expand_paths


def test_concat_and_pack_blocks():
    stream = concat_documents([[5, 6, 7], [8], []], eos_id=0)
    assert stream.tolist() == [5, 6, 7, 0, 8, 0, 0]
    blocks = pack_blocks(stream, 3)
    assert blocks.tolist() == [[5, 6, 7], [0, 8, 0]]  # remainder dropped
    assert pack_blocks(stream, 8).shape == (0, 8)


def test_unigram_perplexity_of_uniform_counts_is_vocab_size():
    counts = np.full(10, 100)
    assert unigram_perplexity(counts, np.arange(10)) == pytest.approx(10.0)


def files_cfg(path, cache, **extra):
    return {"source": "files", "path": str(path), "val_path": None, "val_fraction": 0.25, "text_field": "text",
            "tokenizer": "embedded", "block_size": 16, "batch_size": 2, "cache_dir": str(cache), **extra}


def write_docs(path, n=8):
    rows = [{"text": f"Document {i}. " + "To be or not to be, that is the question. " * (3 + i)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_files_source_packs_holds_out_whole_documents_and_caches(tmp_path):
    data = tmp_path / "docs.jsonl"
    write_docs(data)
    dm = TextDataModule(files_cfg(data, tmp_path / "cache"))
    dm.setup()
    assert dm.train_set.shape[1] == 16 and dm.val_set.shape[1] == 16
    tok = dm.tokenizer
    val_text = tok.decode(dm.val_set[:].flatten().tolist())
    assert "Document 6." in val_text and "Document 7." in val_text  # last 25% of documents
    assert "Document 5." not in val_text
    first = dm.prepare()
    assert dm.prepare() == first  # same inputs: same cache entry
    write_docs(data, n=9)  # changed file: a new cache entry
    assert TextDataModule(files_cfg(data, tmp_path / "cache")).prepare() != first
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (2, 16)


def test_embedded_corpus_validation_is_a_different_work(cache_dir):
    from treeffn.data.corpus import VALIDATION_TITLES, read_documents

    docs = read_documents("shakespeare")
    assert len(docs) == 42 and all(d["text"].strip() for d in docs)
    assert set(VALIDATION_TITLES) <= {d["title"] for d in docs}
    assert len(read_documents("kjv")) == 66


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"   \n\n  ", "only white space"),
    (b"caf\xe9 au lait\n", "not UTF-8"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00", "looks binary"),
])
def test_bad_files_are_refused_with_the_reason(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        expand_paths(str(path), "data.path")
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_paths_and_suffixes_are_refused(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        expand_paths(str(tmp_path / "nope.txt"), "data.path")
    with pytest.raises(DataError, match="data.path is missing"):
        expand_paths("", "data.path")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="suffix"):
        expand_paths(str(tmp_path / "x.csv"), "data.path")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="folder holds no"):
        expand_paths(str(tmp_path / "empty_dir"), "data.path")


def test_tokenizer_dir_without_files_is_refused(tmp_path):
    from treeffn.data.tokenizer import load_tokenizer

    with pytest.raises(DataError, match="no tokenizer files"):
        load_tokenizer(str(tmp_path))


def test_token_files_are_mapped_and_pack_like_text(tmp_path):
    train_ids = np.arange(1, 200, dtype=np.uint16)
    val_ids = np.arange(300, 360, dtype=np.uint16)
    train_ids.tofile(tmp_path / "train.u16")
    np.save(tmp_path / "val.npy", val_ids.astype(np.int64))
    cfg = {"source": "tokens", "path": str(tmp_path / "train.u16"), "val_path": str(tmp_path / "val.npy"),
           "tokenizer": "embedded", "block_size": 16, "batch_size": 2, "cache_dir": str(tmp_path / "cache")}
    dm = TextDataModule(cfg)
    dm.setup()
    assert dm.train_set.shape == (199 // 16, 16) and dm.val_set.shape == (60 // 16, 16)
    assert dm.train_set[:].flatten().tolist() == train_ids[: 12 * 16].tolist()
    assert dm.val_set[:].flatten().tolist() == val_ids[: 3 * 16].tolist()  # .npy: the header is skipped
    assert isinstance(dm.train_set.stream._open()[0], np.memmap)  # mapped, not read into memory


def test_fifo_and_symlink_loop_are_named_for_what_they_are(tmp_path):
    import os

    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match=r"data.path=.*pipe.txt: is a FIFO, not a regular file"):
        expand_paths(str(fifo), "data.path")
    loop = tmp_path / "loop.txt"
    loop.symlink_to(tmp_path / "loop.txt")
    with pytest.raises(DataError, match=r"data.path=.*loop.txt: is a symbolic-link loop"):
        expand_paths(str(loop), "data.path")
