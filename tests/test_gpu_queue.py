"""scripts/gpu_queue.py: slots per GPU, order, dependencies, retries and the full-grid multirun.yaml.

The queue's logic is checked with a stand-in `treeffn` on PATH that only writes each run's
result.json and a line saying when it ran where (the real chain ran as a CPU rehearsal and on the
GPUs: results/finetune_depth_docs)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_queue  # noqa: E402

FAKE = textwrap.dedent('''\
    #!{python}
    """Stand-in for `treeffn train -m sweep=S <point> ...`: a result.json after a short sleep."""
    import json, os, sys, time
    from treeffn.config_files import run_name
    args = sys.argv[3:]
    sweep = next(a.split("=", 1)[1] for a in args if a.startswith("sweep="))
    point = sorted(a for a in args if "=" in a and not a.startswith(("sweep=", "trainer", "hydra/")))
    gpu = next((a.split("=", 1)[1] for a in args if a.startswith("trainer.devices=")), "cpu")
    name = run_name(",".join(point))
    run = os.path.join("runs", "sweeps", sweep, name)
    os.makedirs(run, exist_ok=True)
    start = time.time()
    time.sleep(0.3)
    failing = os.environ.get("FAKE_FAIL", "")
    marker = os.path.join(run, "failed_once")
    if failing and failing in name and (os.environ.get("FAKE_FAIL_ALWAYS") or not os.path.exists(marker)):
        open(marker, "w").close()
        sys.exit(1)
    json.dump({{"status": "finished"}}, open(os.path.join(run, "result.json"), "w"))
    with open("ran.jsonl", "a") as f:
        f.write(json.dumps({{"sweep": sweep, "name": name, "gpu": gpu, "start": start, "end": time.time()}}) + "\\n")
    ''')

PLAN = """\
trainer: gpu
gpus: 2
slots_per_gpu: 3
retries: 1
poll_s: 0.1
sweeps:
  - sweep: table_strategies_opt125m_smoke
    slots: 2
  - sweep: finetune_opt1.3b_smoke
    after: [table_strategies_opt125m_smoke]
"""


def run_queue(tmp_path, env_extra=None):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "treeffn"
    fake.write_text(FAKE.format(python=sys.executable))
    fake.chmod(0o755)
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    work = tmp_path / "work"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", **(env_extra or {})}
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_queue.py"), "serve", str(work), str(plan)],
                   env=env, check=True, timeout=120)
    state = json.loads((work / "queue.json").read_text())
    ran = [json.loads(line) for line in (work / "ran.jsonl").read_text().splitlines()] \
        if (work / "ran.jsonl").exists() else []
    return state, ran


def test_queue_keeps_slots_order_and_dependencies_and_retries_a_failed_run(tmp_path):
    state, ran = run_queue(tmp_path, {"FAKE_FAIL": "seed=1,strategy=node"})
    jobs = state["jobs"]
    assert len(jobs) == 9 + 4 and all(j["status"] == "finished" for j in jobs)
    retried = [j for j in jobs if j["tries"] == 2]
    assert [j["name"] for j in retried] == ["seed=1,strategy=node"]
    # Never more runs on a GPU than its slots (a table_strategies run takes 2 of the 3).
    slots = {"table_strategies_opt125m_smoke": 2, "finetune_opt1.3b_smoke": 1}
    for r in ran:
        t = r["start"] + 1e-3
        busy = sum(slots[o["sweep"]] for o in ran if o["gpu"] == r["gpu"] and o["start"] <= t < o["end"])
        assert busy <= 3
    assert {r["gpu"] for r in ran} == {"[0]", "[1]"}
    # Every fine-tune run starts after every run it depends on has ended.
    pretrain_end = max(r["end"] for r in ran if r["sweep"] == "table_strategies_opt125m_smoke")
    assert min(r["start"] for r in ran if r["sweep"] == "finetune_opt1.3b_smoke") >= pretrain_end


def test_a_run_that_keeps_failing_blocks_the_sweeps_after_it(tmp_path):
    state, _ = run_queue(tmp_path, {"FAKE_FAIL": "seed=0,strategy=dense", "FAKE_FAIL_ALWAYS": "1"})
    by_sweep = {}
    for j in state["jobs"]:
        by_sweep.setdefault(j["sweep"], []).append(j["status"])
    assert by_sweep["table_strategies_opt125m_smoke"].count("failed") == 1
    assert by_sweep["table_strategies_opt125m_smoke"].count("finished") == 8
    assert by_sweep["finetune_opt1.3b_smoke"] == ["blocked"] * 4


def test_full_grid_turns_the_last_points_multirun_file_into_the_whole_grid(tmp_path):
    from omegaconf import OmegaConf

    from treeffn.results.report import load_sweep

    sweep_dir = tmp_path / "runs" / "sweeps" / "depth_opt125m_smoke"
    sweep_dir.mkdir(parents=True)
    cfg = OmegaConf.create({"hydra": {"sweeper": {"params": {"tree.depth": "4,6,8", "strategy": "node,post_sum",
                                                               "seed": "0,1,2"}},
                                      "overrides": {"task": ["sweep=depth_opt125m_smoke", "strategy=post_sum", "seed=0",
                                                             "tree.depth=8", "trainer=gpu", "trainer.devices=[0]"]},
                                      "job": {"config": {"override_dirname": {"exclude_keys": ["trainer", "trainer.devices",
                                                                                               "sweep"],
                                                                             "kv_sep": "=", "item_sep": ","}}}},
                            "sweep_meta": {"name": "depth_opt125m_smoke"}})
    OmegaConf.save(cfg, sweep_dir / "multirun.yaml")
    assert len(load_sweep(str(sweep_dir)).jobs) == 1
    gpu_queue.full_grid(sweep_dir)
    assert len(load_sweep(str(sweep_dir)).jobs) == 18
    assert list(OmegaConf.load(sweep_dir / "multirun.yaml").hydra.overrides.task) == [
        "sweep=depth_opt125m_smoke", "trainer=gpu", "trainer.devices=[0]"]


@pytest.mark.parametrize("plan", sorted((ROOT / "scripts" / "plans").glob("*.yaml")), ids=lambda p: p.name)
def test_the_committed_plans_name_known_sweeps_in_a_runnable_order(plan):
    from treeffn.config_files import group_choices

    loaded = gpu_queue.load_plan(str(plan))
    names = [e["sweep"] for e in loaded["sweeps"]]
    assert set(names) <= set(group_choices("sweep"))
    for i, entry in enumerate(loaded["sweeps"]):
        assert set(entry["after"]) <= set(names[:i])  # a dependency comes earlier in the plan
        assert entry["slots"] <= loaded["slots_per_gpu"]
