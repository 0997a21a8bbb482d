"""The README's Table 6 is what `treeffn report` makes of the committed records (results/table6_docs)."""

from pathlib import Path

import pytest

from treeffn.results.report import build_report, to_markdown

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "results" / "table6_docs"


def readme_block(marker: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    start, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    assert start in text and end in text, marker
    block = text[text.index(start) + len(start):text.index(end)]
    return [line.strip() for line in block.splitlines() if line.strip()]


@pytest.mark.parametrize("marker, sweep", [("table6", "table_strategies_opt125m_docs"),
                                           ("table6-tree-lr3", "table_strategies_opt125m_docs_tree_lr3")])
def test_readme_table_is_the_report_of_the_committed_records(marker, sweep, tmp_path):
    report = build_report(sweep, runs_root=str(RECORDS), out=str(tmp_path))
    assert report.counts == {"finished": len(report.points)}
    table = [line for line in to_markdown(report).splitlines() if line.startswith("|")]
    assert readme_block(marker) == table


def test_the_records_hold_what_the_issue_asks_for():
    runs = sorted((RECORDS / "sweeps" / "table_strategies_opt125m_docs").glob("seed=*"))
    assert len(runs) == 9
    import json

    for run in runs:
        result = json.loads((run / "result.json").read_text())
        assert result["status"] == "finished" and result["tokens_seen"] >= 50_000_000
        for name in ("config.yaml", "environment.json", "logs/csv/metrics.csv"):
            assert (run / name).is_file(), (run.name, name)
        if result["ffn"] == "tree":
            analysis = json.loads((run / "analysis" / "analysis.json").read_text())
            assert analysis["tokens"] == result["routing"]["tokens"] == 593_920
            assert analysis["initial_step"] == 0
