"""Sweep definitions (sweeps/sweep/*.yaml), the grid -> run-dir mapping, and `treeffn report`.

Fast tests compose every sweep and build reports from hand-written run dirs; one slow test runs
the table_strategies smoke sweep for real (tiny overrides) and reports it. The kill-and-rerun
behaviour through Slurm (or submitit's local launcher) is in test_slurm.py.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess

# Tokens in the embedded corpus's training stream (tests/test_prepare.py prepares it and checks).
EMBEDDED_TRAIN_TOKENS = 1452948
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cli
from treeffn.config_files import group_choices
from treeffn.results import report as rp

SWEEPS = group_choices("sweep")
SMOKE = "table_strategies_opt125m_smoke"
# Shrinks the smoke sweep further for CI: a 1-layer, 32-wide OPT, 6 steps.
TINY_SWEEP = ["model.hidden_size=32", "model.word_embed_proj_dim=32", "model.num_hidden_layers=1",
              "model.ffn_dim=128", "trainer.max_steps=6", "trainer.val_check_interval=6",
              "trainer.limit_val_batches=2", "checkpoint.every_n_steps=3"]


def compose(name: str, *overrides: str):
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("treeffn.conf", version_base="1.3"):
            return hydra_compose("config", overrides=[f"sweep={name}", *overrides], return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


# ------------------------------------------------------------------------------ definitions
def test_the_issue_sweeps_and_their_smoke_twins_exist():
    for name in ("table_strategies_opt125m", "depth_opt125m", "activation_opt125m", "finetune_opt1.3b",
                 "scratch_opt1.3b", "qa_eval"):
        assert name in SWEEPS and f"{name}_smoke" in SWEEPS


@pytest.mark.parametrize("name", SWEEPS)
def test_every_sweep_composes_and_declares_its_table(name):
    from omegaconf import OmegaConf

    cfg = compose(name)
    meta = OmegaConf.to_container(cfg.sweep_meta, resolve=False)
    assert meta["name"] == name
    assert isinstance(meta.get("table"), str) and meta["table"]
    assert meta["runs"] in SWEEPS  # its runs live in a sweep's own folder (qa_eval: its source's)
    assert str(OmegaConf.select(cfg, "hydra.sweep.dir")).endswith(f"sweeps/{meta['runs']}")
    assert meta.get("metric", "val_ppl") == "val_ppl"

    sweep = rp.Sweep(name=name, dir=Path("."), meta=meta, jobs=rp.expand_grid(
        OmegaConf.to_container(cfg.hydra.sweeper.params), []), exclude_keys=[])
    grid_keys = set(rp.job_values(sweep.jobs[0]))
    factors, seed_key = rp.factors_of(sweep)
    assert set(factors) <= grid_keys and factors == meta["factors"]
    assert seed_key in grid_keys or seed_key in cfg  # swept, or one fixed seed

    # The declared token budget is what the config trains: steps x tokens per step, where a step is
    # optim.global_batch_tokens or sequences x tokens x accumulation x devices x nodes.
    t, d = cfg.trainer, cfg.data
    per_step = cfg.optim.get("global_batch_tokens") or (
        d.batch_size * d.block_size * t.accumulate_grad_batches * t.devices * t.get("num_nodes", 1))
    assert t.max_steps * per_step == meta["token_budget"]
    # Honest budgets: the unique tokens the data gives, and passes over them (<= 1 for the tables).
    if d.source == "embedded":
        assert meta["unique_train_tokens"] == EMBEDDED_TRAIN_TOKENS
    else:
        assert meta["unique_train_tokens"] == d.max_train_tokens, "hub sweeps prepare exactly their budget"
    assert meta["epochs"] == round(meta["token_budget"] / meta["unique_train_tokens"], 4)
    if not name.endswith("_smoke") and name != "autopruning_cpu" and not meta.get("repeats_data"):
        assert meta["epochs"] <= 1, f"{name} would repeat its data (or says why in sweep_meta.repeats_data)"

    if name.endswith("_smoke"):
        full = OmegaConf.to_container(compose(meta["smoke_of"]).sweep_meta, resolve=False)
        assert meta["smoke_of"] == name.removesuffix("_smoke")
        assert meta["factors"] == full["factors"] and meta["table"] != full["table"]
        assert cfg.model.name == "tiny" and cfg.data.source == "embedded"
    for ref in meta.get("reference") or []:
        assert ref["sweep"] in SWEEPS
    for spec in meta.get("eval_metrics") or []:
        task, metric = spec.split(":")
        assert task in cfg.eval.tasks and metric
    if name.startswith("qa_eval"):
        assert cfg.eval_after_train is True


def test_cfg_job_prints_each_sweep_through_the_cli(tmp_path):
    """`treeffn train --cfg job sweep=<name>`: one process for all (the CLI path users take)."""
    code = ("import sys\nfrom treeffn.cli.main import main\n"
            "for name in sys.argv[1:]:\n"
            "    print('=== ' + name, flush=True)\n"
            "    main(['train', '--cfg', 'job', 'sweep=' + name])\n"
            "    from hydra.core.global_hydra import GlobalHydra; GlobalHydra.instance().clear()\n")
    out = subprocess.run([sys.executable, "-c", code, *SWEEPS], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    chunks = out.stdout.split("=== ")[1:]
    assert [c.splitlines()[0] for c in chunks] == SWEEPS
    for chunk in chunks:
        assert "sweep_meta:" in chunk and "model:" in chunk


def test_sweep_dirs_do_not_name_the_sweep_file(tmp_path):
    """The run dir of a grid point is the same whichever sweep file launched it (qa_eval reuses
    its source's runs); common/train_sweep.yaml restates conf/config.yaml's exclude list plus
    `sweep`, and must not drift from it."""
    from omegaconf import OmegaConf

    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module("treeffn.conf", version_base="1.3"):
        plain = hydra_compose("config", return_hydra_config=True)
    GlobalHydra.instance().clear()
    base = list(OmegaConf.select(plain, "hydra.job.config.override_dirname.exclude_keys"))
    swept = list(OmegaConf.select(compose(SMOKE), "hydra.job.config.override_dirname.exclude_keys"))
    assert swept == base + ["sweep"]

    a = rp.load_sweep(SMOKE, runs_root=str(tmp_path))
    b = rp.load_sweep("qa_eval_smoke", runs_root=str(tmp_path))
    assert a.dir == b.dir
    assert [rp.run_dir_name(j, a) for j in a.jobs] == [rp.run_dir_name(j, b) for j in b.jobs]
    assert rp.run_dir_name(a.jobs[0], a) == "seed=0,strategy=dense"


def test_grid_follows_hydras_basic_sweeper_order_and_command_line_wins():
    jobs = rp.expand_grid({"strategy": "dense,node,post_sum", "seed": "0,1,2"}, ["sweep=x", "seed=0,1", "a.b=3"])
    assert len(jobs) == 6
    assert jobs[0] == ["strategy=dense", "seed=0", "sweep=x", "a.b=3"]
    assert jobs[1] == ["strategy=dense", "seed=1", "sweep=x", "a.b=3"]
    assert [rp.job_values(j)["strategy"] for j in jobs] == ["dense", "dense", "node", "node", "post_sum", "post_sum"]


def test_sweep_and_strategy_are_known_to_the_override_checks(tmp_path):
    bad = run_cli(["train", "sweep=nope"], cwd=tmp_path)
    assert bad.returncode == 2 and "sweep=nope is not a sweep preset" in bad.stderr
    assert "table_strategies_opt125m_smoke" in bad.stderr
    ok = run_cli(["train", "--cfg", "job", f"sweep={SMOKE}", "strategy=post_sum"], cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "placement: post_sum" in ok.stdout


# ------------------------------------------------------------------------------ report (synthetic runs)
def write_run(run_dir: Path, status: str, **fields) -> None:
    """A run dir as train() leaves it: config.yaml always; result.json unless the job was killed."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text("seed: 0\n")
    if status == "killed":
        return
    (run_dir / "result.json").write_text(json.dumps({"status": status, "run_dir": str(run_dir), **fields}))
    csv_dir = run_dir / "logs" / "csv"
    csv_dir.mkdir(parents=True, exist_ok=True)
    (csv_dir / "metrics.csv").write_text("epoch,step,train/loss,val/ppl\n0,9,7.0,\n0,19,6.0,\n0,19,,500\n")


def finished(ppl: float, ffn: str = "tree", depth: int = 6) -> dict:
    return {"val_ppl": ppl, "val_loss": 6.0, "ffn": ffn, "steps": 40, "tokens_seen": 20480, "wall_s": 3.0,
            "active_ffn_fraction": 1.0 if ffn == "dense" else 0.055, "params_ffn": 1000, "params_total": 9000,
            "tree": {"depth": depth, "trees": 4} if ffn == "tree" else None}


def launch_record(sweep_dir: Path, name: str) -> None:
    """The multirun.yaml `treeffn train -m sweep=<name>` writes (no extra overrides)."""
    from omegaconf import OmegaConf, open_dict

    cfg = compose(name)
    with open_dict(cfg):
        cfg.hydra.overrides.task = [f"sweep={name}"]
    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, sweep_dir / "multirun.yaml")


def test_report_marks_failed_killed_preempted_and_missing_points(tmp_path):
    sweep = rp.load_sweep(SMOKE, runs_root=str(tmp_path / "runs"))
    launch_record(sweep.dir, SMOKE)
    names = {tuple(rp.job_values(j).values())[:2]: rp.run_dir_name(j, sweep) for j in sweep.jobs}
    ppl = {"dense": 100.0, "node": 120.0, "post_sum": 110.0}
    for (strategy, seed), name in names.items():
        run = sweep.dir / name
        if (strategy, seed) == ("node", "1"):
            write_run(run, "killed")
        elif (strategy, seed) == ("node", "2"):
            write_run(run, "failed", error="RuntimeError: boom")
        elif (strategy, seed) == ("post_sum", "2"):
            continue  # never started
        elif (strategy, seed) == ("post_sum", "1"):
            write_run(run, "preempted", signal="SIGTERM", steps=20)
        else:
            write_run(run, "finished", **finished(ppl[strategy] + int(seed), "dense" if strategy == "dense" else "tree"))

    report = rp.write_report(rp.build_report(SMOKE, runs_root=str(tmp_path / "runs")))
    assert report.counts == {"finished": 5, "failed": 2, "preempted": 1, "missing": 1}
    rows = {r.label["strategy"]: r.stats for r in report.rows}
    assert list(rows) == ["dense", "node", "post_sum"]
    assert rows["dense"]["n"] == 3 and rows["dense"]["mean"] == pytest.approx(101.0)
    assert rows["dense"]["std"] == pytest.approx(1.0)  # sample std of 100, 101, 102
    assert rows["node"]["n"] == 1 and rows["node"]["std"] is None
    assert rows["node"]["status"] == "seed=1 failed; seed=2 failed"
    assert rows["post_sum"]["status"] == "seed=1 preempted; seed=2 missing"

    md = report.files["markdown"].read_text()
    assert "| dense | 101.00 ± 1.00 | 3/3 | 100.0% |" in md
    assert "the job was killed" in md and "RuntimeError: boom" in md and "never started" in md
    with report.files["csv"].open() as f:
        table = list(csv.DictReader(f))
    assert [r["strategy"] for r in table] == ["dense", "node", "post_sum"] and table[1]["n_finished"] == "1"
    tex = report.files["latex"].read_text()
    assert r"dense & $101.00 \pm 1.00$ & 3/3 & 100.0\% \\" in tex and r"post\_sum" in tex
    with report.files["runs_csv"].open() as f:
        assert len(list(csv.DictReader(f))) == 9
    for plot in ("ppl_vs_active", "ppl_vs_depth", "curves"):
        assert report.files[plot].stat().st_size > 1000


def test_report_adds_reference_rows_and_qa_columns(tmp_path):
    runs = tmp_path / "runs"
    strategies = rp.load_sweep(SMOKE, runs_root=str(runs))
    launch_record(strategies.dir, SMOKE)
    for job in strategies.jobs:
        v = rp.job_values(job)
        run = strategies.dir / rp.run_dir_name(job, strategies)
        write_run(run, "finished", **finished(90.0 + int(v["seed"]), "dense" if v["strategy"] == "dense" else "tree"))
        evals = {"tasks": {"treeffn_nextverse_kjv": {f"{k}shot": {"metrics": {"acc": 0.25 + k / 10}} for k in (0, 2)}}}
        (run / "eval.json").write_text(json.dumps(evals))

    depth = rp.load_sweep("depth_opt125m_smoke", runs_root=str(runs))
    launch_record(depth.dir, "depth_opt125m_smoke")
    for job in depth.jobs:
        v = rp.job_values(job)
        write_run(depth.dir / rp.run_dir_name(job, depth), "finished", **finished(100.0 + int(v["tree.depth"]),
                                                                               depth=int(v["tree.depth"])))
    report = rp.write_report(rp.build_report("depth_opt125m_smoke", runs_root=str(runs)))
    assert [r.name for r in report.rows][-1] == f"dense (from {SMOKE})"
    assert report.rows[-1].stats["mean"] == pytest.approx(91.0) and report.rows[-1].stats["n"] == 3
    assert len(report.rows) == 3 * 2 + 1 and report.files["ppl_vs_depth"].exists()

    plain = rp.build_report(SMOKE, runs_root=str(runs))  # no eval_metrics declared: headline metrics found
    assert plain.qa == [("treeffn_nextverse_kjv", "acc", 0), ("treeffn_nextverse_kjv", "acc", 2)]
    qa = rp.write_report(rp.build_report("qa_eval_smoke", runs_root=str(runs)))
    assert qa.out_dir == strategies.dir / "report_qa_eval_smoke"
    assert qa.qa == [("treeffn_nextverse_kjv", "acc", 0), ("treeffn_nextverse_kjv", "acc", 2)]
    md = qa.files["markdown"].read_text()
    assert "treeffn_nextverse_kjv acc (2-shot)" in md and "0.450" in md


def test_report_cli_errors_are_one_line(tmp_path):
    out = run_cli(["report", "sweep=nope"], cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "is not a sweep name or dir" in out.stderr
    out = run_cli(["report", "sweep=" + str(tmp_path)], cwd=tmp_path)
    assert out.returncode == 2 and "not a sweep dir" in out.stderr
    out = run_cli(["report", "table=1"], cwd=tmp_path)
    assert out.returncode == 2 and "table is not a key of treeffn report" in out.stderr


# ------------------------------------------------------------------------------ a real smoke sweep
@pytest.mark.slow
def test_smoke_sweep_then_report_gives_the_strategies_table(tmp_path, cache_dir):
    """`treeffn train -m sweep=table_strategies_opt125m_smoke` (basic launcher, shrunk) then
    `treeffn report`: rows dense / node / post_sum with three seeds each, mean ± std."""
    train = run_cli(["train", "-m", f"sweep={SMOKE}", *TINY_SWEEP], cwd=tmp_path, timeout=900)
    assert train.returncode == 0, train.stderr[-3000:]
    out = run_cli(["report", f"sweep={SMOKE}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "9 grid points: 9 finished" in out.stdout
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and " 3/3 " in line]
    assert [r.split("|")[1].strip() for r in rows] == ["dense", "node", "post_sum"]
    assert all(" ± " in r and r.rstrip().endswith("| ok |") for r in rows)
    report_dir = tmp_path / "runs" / "sweeps" / SMOKE / "report"
    for name in ("table.md", "table.csv", "table.tex", "runs.csv", "ppl_vs_active.png", "curves.png", "routing.png"):
        assert (report_dir / name).exists(), name
    assert os.path.getsize(report_dir / "curves.png") > 1000

    # The tree rows against dense and their routing columns, recomputed from the run records.
    table = {r["strategy"]: r for r in csv.DictReader(open(report_dir / "table.csv"))}
    assert table["dense"]["minus_dense"] == "" and table["dense"]["leaf_entropy_mean"] == ""
    results = {}
    for run in (tmp_path / "runs" / "sweeps" / SMOKE).glob("*/result.json"):
        strategy = rp.job_values(run.parent.name.split(","))["strategy"]
        results.setdefault(strategy, []).append(json.loads(run.read_text()))
    dense_ppl = [r["val_ppl"] for r in results["dense"]]
    for strategy in ("node", "post_sum"):
        ppl = [r["val_ppl"] for r in results[strategy]]
        row = table[strategy]
        assert float(row["minus_dense"]) == pytest.approx(sum(ppl) / 3 - sum(dense_ppl) / 3)
        import statistics
        se = (statistics.stdev(ppl) ** 2 / 3 + statistics.stdev(dense_ppl) ** 2 / 3) ** 0.5
        assert float(row["minus_dense_se"]) == pytest.approx(se)
        entropy = [r["routing"]["mean"]["leaf_entropy"] for r in results[strategy]]
        sparsity = [r["routing"]["train_window"]["mean"]["dead_frac"] for r in results[strategy]]
        assert float(row["leaf_entropy_mean"]) == pytest.approx(statistics.fmean(entropy))
        assert float(row["static_sparsity_mean"]) == pytest.approx(statistics.fmean(sparsity))
    assert "− dense (± s.e.)" in out.stdout and "static sparsity" in out.stdout and "Routing columns" in out.stdout


def test_gpu_shared_spreads_the_jobs_of_a_sweep_over_the_gpus():
    from treeffn.config_files import gpu_of_job

    assert [gpu_of_job(k, 2) for k in range(5)] == [[0], [1], [0], [1], [0]]
    assert gpu_of_job(7, 1) == [0]
    with pytest.raises(ValueError, match="needs a GPU"):
        gpu_of_job(0, 0)
