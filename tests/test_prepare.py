"""Corpus preparation: streamed, sharded, exact, budgeted, once under concurrency, and refusals."""

from __future__ import annotations

import json
import multiprocessing
import os

import numpy as np
import pytest

from treeffn.data.datamodule import TextDataModule
from treeffn.data.prepare import prepare_corpus
from treeffn.data.shards import META_FILE, read_meta
from treeffn.data.sources import DataError
from treeffn.data.tokenizer import load_tokenizer

WORDS = "the quick brown fox jumps over lazy dogs while seven wizards quietly hex a jovial zebra".split()


def documents(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(5, 120)))
        docs.append(f"Doc {i}: " + " ".join(words) + rng.choice([".", "!", "?"]) + ("\n" + "x" * int(rng.integers(0, 4))))
    return docs


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")


def data_cfg(path, cache, **extra):
    return {"source": "files", "path": str(path), "val_path": None, "val_fraction": 0.25, "text_field": "text",
            "tokenizer": "embedded", "block_size": 16, "batch_size": 2, "cache_dir": str(cache),
            "max_train_tokens": None, "max_val_tokens": None, "shard_tokens": 1024, **extra}


def direct_stream(docs, tok) -> list[int]:
    """What the shards must hold: each document tokenized whole, then the end-of-text token."""
    out = []
    for d in docs:
        out += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return out


def read_split(folder, split) -> list[int]:
    meta = read_meta(folder)
    return np.concatenate([np.fromfile(folder / split / s["file"], dtype=meta["dtype"])
                           for s in meta["splits"][split]["shards"]]).tolist()


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "txt"])
def test_shards_equal_a_direct_tokenization(tmp_path, kind):
    tok = load_tokenizer("embedded")
    docs = documents(120)
    if kind == "jsonl":
        path = tmp_path / "c.jsonl"
        write_jsonl(path, docs)
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "c.parquet"
        pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), path, row_group_size=17)
    else:
        docs = [d.replace("\n", " ").strip() for d in docs]  # a paragraph per document
        path = tmp_path / "c.txt"
        path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    folder, built = prepare_corpus(data_cfg(path, tmp_path / "cache"), tok, tmp_path / "cache")
    assert built
    meta = read_meta(folder)
    assert meta["splits"]["train"]["documents"] == 90 and meta["splits"]["validation"]["documents"] == 30
    assert read_split(folder, "train") == direct_stream(docs[:90], tok)
    assert read_split(folder, "validation") == direct_stream(docs[90:], tok)
    assert len(meta["splits"]["train"]["shards"]) > 1  # 1024-token shards: the stream spans files
    assert meta["dtype"] == "<u2" and meta["tokenizer"] and meta["source"]["kind"] == "files"
    # The same settings find the same copy; blocks cross shard boundaries as one stream.
    again, built = prepare_corpus(data_cfg(path, tmp_path / "cache"), tok, tmp_path / "cache")
    assert again == folder and not built
    dm = TextDataModule(data_cfg(path, tmp_path / "cache"))
    dm.setup()
    flat = direct_stream(docs[:90], tok)
    assert dm.train_set[:].flatten().tolist() == flat[: len(flat) // 16 * 16]
    assert dm.train_set[63].tolist() == flat[63 * 16: 64 * 16]  # block 63 spans shards 0 and 1


def test_a_long_single_line_document_is_tokenized_in_pieces_exactly(tmp_path, monkeypatch):
    import treeffn.data.prepare as prepare

    monkeypatch.setattr(prepare, "PIECE_CHARS", 500)
    tok = load_tokenizer("embedded")
    rng = np.random.default_rng(1)
    long_doc = " ".join(rng.choice(WORDS + ["  spaced", "x,y", "12 345", "don't"], size=3000))
    path = tmp_path / "one.txt"
    path.write_text(long_doc + "\n\nA short second paragraph.\n", encoding="utf-8")
    folder, _ = prepare_corpus(data_cfg(path, tmp_path / "cache", val_fraction=0.5), tok, tmp_path / "cache")
    assert read_split(folder, "train") == direct_stream([long_doc], tok)


def test_budgets_stop_the_streams_and_an_unfillable_budget_is_refused(tmp_path):
    tok = load_tokenizer("embedded")
    path = tmp_path / "c.jsonl"
    write_jsonl(path, documents(80))
    cfg = data_cfg(path, tmp_path / "cache", max_train_tokens=700, max_val_tokens=100)
    folder, _ = prepare_corpus(cfg, tok, tmp_path / "cache")
    meta = read_meta(folder)
    assert meta["splits"]["train"]["tokens"] == 700 and meta["splits"]["validation"]["tokens"] == 100
    assert read_split(folder, "train") == direct_stream(documents(80)[:60], tok)[:700]
    with pytest.raises(DataError, match=r"data.max_train_tokens=10000000 is larger than the source") as err:
        prepare_corpus(data_cfg(path, tmp_path / "cache", max_train_tokens=10_000_000), tok, tmp_path / "cache")
    assert "\n" not in str(err.value)
    prepared = tmp_path / "cache" / "prepared"
    complete = [p for p in prepared.iterdir() if (p / META_FILE).exists()]
    assert complete == [folder] and not [p for p in prepared.iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize("content, message", [
    ('{"text": "a"}\n{"body": "b"}\n', r"line 2 has no 'text' field \(data.text_field\); its fields: body"),
    ('{"text": "a"}\n{"text": "b"}\n{"text": "c"}\n{"text": "d"}\n{"text": "e"\n', r"line 5 is not valid JSON"),
    ('{"text": 5}\n', r"field 'text' is int, not text"),
])
def test_bad_json_lines_are_refused_naming_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as err:
        prepare_corpus(data_cfg(path, tmp_path / "cache", val_fraction=0.5), load_tokenizer("embedded"),
                       tmp_path / "cache")
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_prepared_shards_refuse_another_tokenizer_and_a_truncated_shard(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path / "c.jsonl"
    write_jsonl(path, documents(60))
    cfg = data_cfg(path, tmp_path / "cache")
    folder, _ = prepare_corpus(cfg, load_tokenizer("embedded"), tmp_path / "cache")
    other = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}},
                                       unk_token="[UNK]"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    other_dir = tmp_path / "other_tok"
    PreTrainedTokenizerFast(tokenizer_object=other, eos_token="<|endoftext|>").save_pretrained(other_dir)
    tokens_cfg = {**cfg, "source": "tokens", "path": str(folder), "tokenizer": str(other_dir)}
    with pytest.raises(DataError, match="shards were made with tokenizer 'embedded' .*use the tokenizer the shards"):
        TextDataModule(tokens_cfg).setup()
    shard = folder / "train" / "000001.bin"
    os.truncate(shard, shard.stat().st_size - 6)
    with pytest.raises(DataError, match=f"{shard}: token shard has .* bytes, its record says"):
        TextDataModule(cfg).setup()


def test_a_prepared_folder_trains_as_data_tokens(tmp_path):
    path = tmp_path / "c.jsonl"
    write_jsonl(path, documents(60))
    cfg = data_cfg(path, tmp_path / "cache")
    files = TextDataModule(cfg)
    files.setup()
    tokens = TextDataModule({**cfg, "source": "tokens", "path": files.stats["prepared"], "val_path": None})
    tokens.setup()
    assert tokens.train_set[:].tolist() == files.train_set[:].tolist()
    assert tokens.stats["unigram_ppl"] == pytest.approx(files.stats["unigram_ppl"])


def _prepare_after(barrier, cfg, out):
    barrier.wait()  # all start at the same moment, as a sweep's array jobs would
    folder, built = prepare_corpus(cfg, load_tokenizer("embedded"), cfg["cache_dir"])
    with open(out, "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "folder": str(folder), "built": built}) + "\n")


def test_eight_concurrent_preparations_make_one_copy(tmp_path):
    path = tmp_path / "c.jsonl"
    write_jsonl(path, documents(400))
    cfg = data_cfg(path, str(tmp_path / "cache"))
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(8)
    out = tmp_path / "outcomes.jsonl"
    procs = [ctx.Process(target=_prepare_after, args=(barrier, cfg, str(out))) for _ in range(8)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(300)
    assert [proc.exitcode for proc in procs] == [0] * 8
    outcomes = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(outcomes) == 8 and len({o["folder"] for o in outcomes}) == 1
    assert sum(o["built"] for o in outcomes) == 1  # one prepared, seven waited and reused it
    prepared = tmp_path / "cache" / "prepared"
    assert [p.name for p in prepared.iterdir() if p.is_dir()] == [os.path.basename(outcomes[0]["folder"])]
    assert read_meta(prepared / os.path.basename(outcomes[0]["folder"]))["prepared"]["pid"] in {o["pid"] for o in outcomes}


def test_a_crashed_preparation_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    import treeffn.data.prepare as prepare

    path = tmp_path / "c.jsonl"
    write_jsonl(path, documents(60))
    cfg = data_cfg(path, tmp_path / "cache")
    calls = {"n": 0}
    real = prepare.ShardWriter.write

    def dying_write(self, ids):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # a Ctrl-C or a kill in the middle of writing shards
        return real(self, ids)

    monkeypatch.setattr(prepare.ShardWriter, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(cfg, load_tokenizer("embedded"), tmp_path / "cache")
    prepared = tmp_path / "cache" / "prepared"
    assert not [p for p in prepared.iterdir() if p.is_dir()]
    monkeypatch.setattr(prepare.ShardWriter, "write", real)
    folder, built = prepare_corpus(cfg, load_tokenizer("embedded"), tmp_path / "cache")
    assert built and (folder / META_FILE).exists()


def test_usage_histogram_stays_within_wandb_bins_for_any_shape():
    import torch

    from treeffn.analysis.routing import MAX_HISTOGRAM_BINS, usage_histogram

    for trees, depth in ((4, 6), (24, 6), (64, 6), (12, 7), (1, 12), (3, 15)):
        counts = torch.randint(0, 100, (trees, 2**depth))
        bins, what = usage_histogram(counts)
        assert bins.numel() <= MAX_HISTOGRAM_BINS and bins.sum() == counts.sum(), (trees, depth, what)
    bins, what = usage_histogram(torch.arange(8).view(2, 4))
    assert bins.tolist() == list(range(8)) and what == "leaf (tree-major)"


def test_the_embedded_training_stream_has_the_tokens_the_sweeps_declare(tmp_path):
    from tests.test_sweeps import EMBEDDED_TRAIN_TOKENS

    cfg = {**data_cfg("", tmp_path), "source": "embedded", "corpus": "shakespeare"}
    folder, _ = prepare_corpus(cfg, load_tokenizer("embedded"), tmp_path)
    meta = read_meta(folder)
    assert meta["splits"]["train"]["tokens"] == EMBEDDED_TRAIN_TOKENS
    assert meta["splits"]["validation"]["documents"] == 1  # Hamlet


def test_prepare_verb_prints_the_folder_and_refuses_bad_input_in_one_line(tmp_path):
    from tests.conftest import run_cli

    path = tmp_path / "c.jsonl"
    write_jsonl(path, documents(60))
    env = {"TREEFFN_CACHE": str(tmp_path / "cache")}
    out = run_cli(["prepare", "data=files", f"data.path={path}"], cwd=tmp_path, env_extra=env, timeout=120)
    assert out.returncode == 0, out.stderr
    folder = out.stdout.splitlines()[0].removeprefix("prepared corpus: ")
    assert (tmp_path / "cache" / "prepared" / folder.rsplit("/", 1)[1] / META_FILE).is_file()
    assert f"data=tokens data.path={folder}" in out.stdout
    for args, words in ((["data.max_train_tokens=100000000"], "data.max_train_tokens=100000000 is larger than the source"),
                        (["data.text_field=body"], "has no 'body' field (data.text_field)")):
        out = run_cli(["prepare", "data=files", f"data.path={path}", *args], cwd=tmp_path, env_extra=env, timeout=120)
        lines = [line for line in out.stderr.splitlines() if line.strip() and not line.startswith("prepare ")]
        assert out.returncode == 2 and len(lines) == 1 and words in lines[0], out.stderr
