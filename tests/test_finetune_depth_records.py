"""The README's fine-tune, depth and width tables are what `treeffn report` makes of the
committed records (results/finetune_depth_docs), and the records hold what the issue asks for."""

import json
from pathlib import Path

import pytest

from tests.test_table6_records import readme_block
from treeffn.results.report import build_report, to_markdown

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "results" / "finetune_depth_docs"
SWEEPS = {"finetune_opt125m_docs_pretrain": 1, "finetune_opt125m_docs": 12, "finetune_opt125m_docs_scratch": 1,
          "dense_opt125m_docs_30m": 1, "depth_opt125m_docs": 10, "width_opt125m_docs": 3}


@pytest.mark.parametrize("marker, sweep", [("finetune-docs", "finetune_opt125m_docs"),
                                           ("depth-docs", "depth_opt125m_docs"),
                                           ("width-docs", "width_opt125m_docs")])
def test_readme_table_is_the_report_of_the_committed_records(marker, sweep, tmp_path):
    report = build_report(sweep, runs_root=str(RECORDS), out=str(tmp_path))
    assert report.counts == {"finished": len(report.points)} and report.points
    table = [line for line in to_markdown(report).splitlines() if line.startswith("|")]
    assert readme_block(marker) == table


def results(sweep):
    return {run.name: json.loads((run / "result.json").read_text())
            for run in sorted((RECORDS / "sweeps" / sweep).iterdir()) if (run / "result.json").is_file()}


def test_every_run_of_the_session_finished_with_its_records():
    for sweep, expected in SWEEPS.items():
        runs = results(sweep)
        assert len(runs) == expected, sweep
        for name, result in runs.items():
            assert result["status"] == "finished"
            low = 50_000_000 if sweep.startswith("finetune_opt125m_docs_") else (
                16_000_000 if sweep == "finetune_opt125m_docs" else 30_000_000)
            assert result["tokens_seen"] >= low, (sweep, name)
            run = RECORDS / "sweeps" / sweep / name
            for file in ("config.yaml", "environment.json", "command.json", "logs/csv/metrics.csv"):
                assert (run / file).is_file(), (sweep, name, file)


def test_the_fine_tune_records_state_the_conversion_and_the_recovery():
    pretrained = results("finetune_opt125m_docs_pretrain")["seed=0,strategy=dense"]
    for name, result in results("finetune_opt125m_docs").items():
        start = result["val_at_start"]
        assert start["step"] == 0 and result["steps"] == 1000
        if "strategy=dense" in name:  # the same weights on the same tokens: the same number
            assert start["val_loss"] == pretrained["val_loss"]
        else:
            assert start["val_ppl"] > 100 * pretrained["val_ppl"]  # the trees replace every MLP
            assert result["val_ppl"] < start["val_ppl"]
