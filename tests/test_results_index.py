"""Many processes appending to one results index at once lose and tear no record."""

import multiprocessing

from treeffn.results.index import append_record, latest_by_run, read_index


def _writer(args):
    path, worker = args
    for i in range(5):
        append_record(path, {"run_dir": f"w{worker}-{i}", "payload": "x" * (500 + worker * 37)})


def test_concurrent_index_writers_lose_and_tear_nothing(tmp_path):
    path = tmp_path / "index.jsonl"
    # spawn, not fork: a forked child of a process that already ran torch can deadlock.
    with multiprocessing.get_context("spawn").Pool(8) as pool:
        pool.map(_writer, [(path, w) for w in range(40)])
    lines = path.read_text().splitlines()
    assert len(lines) == 200
    records = read_index(path)
    assert len(records) == 200
    assert {r["run_dir"] for r in records} == {f"w{w}-{i}" for w in range(40) for i in range(5)}


def test_a_torn_line_is_skipped_and_the_newest_record_wins(tmp_path):
    path = tmp_path / "index.jsonl"
    append_record(path, {"run_dir": "a", "status": "failed"})
    with open(path, "a") as f:
        f.write('{"run_dir": "b", "sta')  # a writer killed mid-line on a lock-less file system
    append_record(path, {"run_dir": "a", "status": "finished"})
    records = read_index(path)
    assert [r["status"] for r in records] == ["failed", "finished"]
    assert latest_by_run(records)["a"]["status"] == "finished"
