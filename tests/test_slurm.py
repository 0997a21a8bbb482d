"""A smoke sweep through a real Slurm cluster: kill one job, cancel another, report, rerun, report.

The `slurm` variant starts a one-node cluster on this machine (tests/slurm_cluster.py: Debian's
slurm-wlm + munge, root) and submits table_strategies_opt125m_smoke through
hydra/launcher=slurm_1gpu (sbatch arrays). Where Slurm is absent it is skipped with the reason,
and the `local_parallel` variant runs the same steps through submitit's local launcher (one
subprocess per job) instead; set TREEFFN_TEST_LOCAL_PARALLEL=1 to run that one beside Slurm.

What must hold (issue 5): killing one job leaves the other jobs' records intact and the report
shows that point as failed; a cancelled job (scancel, SIGTERM) leaves a checkpoint and shows as
preempted; rerunning the same command fills both in without retraining the finished runs; the
final report has rows dense / node / post_sum with three seeds each.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from tests import slurm_cluster
from tests.test_sweeps import SMOKE, TINY_SWEEP
from treeffn.results import report as rp
from treeffn.results.index import read_index

pytestmark = pytest.mark.slow

# The tiny sweep, made long enough to be stopped mid-training: 6 steps last ~0.35 s, less than a
# loaded 2-core CI machine took to notice the job start and stop it. With 60 steps and a
# checkpoint every 10, the stop lands after the first checkpoint and ~50 steps (~3 s) before the end.
STEPS, EVERY = 60, 10
KILLABLE_SWEEP = [o for o in TINY_SWEEP if not o.startswith(("trainer.max_steps=", "trainer.val_check_interval=",
                                                              "checkpoint.every_n_steps="))] + [
    f"trainer.max_steps={STEPS}", f"trainer.val_check_interval={STEPS}", f"checkpoint.every_n_steps={EVERY}"]
# The preset as a site would use it, minus what this GPU-less one-node cluster lacks.
SLURM_HERE = ["hydra/launcher=slurm_1gpu", "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
              "hydra.launcher.mem_gb=null", "hydra.launcher.timeout_min=30"]
LOCAL_PARALLEL = ["hydra/launcher=local_parallel"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = slurm_cluster.unavailable()
    if reason:
        pytest.skip(reason)
    c = slurm_cluster.LocalSlurm(tmp_path_factory.mktemp("slurm"))
    c.start()
    yield c
    c.stop()


def wait_for(predicate, timeout: float, what: str, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def sweep_command(launcher_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "treeffn.cli.main", "train", "-m", f"sweep={SMOKE}", *launcher_args, *KILLABLE_SWEEP]


def report(cwd: Path, env: dict) -> str:
    out = subprocess.run([sys.executable, "-m", "treeffn.cli.main", "report", f"sweep={SMOKE}", "plots=false"],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def table_row(text: str, strategy: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {strategy} |"))


# ------------------------------------------------------------------------------ stopping two jobs
# Two ways a job ends early. "kill": SIGKILL to the job's processes, as a node's OOM killer or a
# crash does; nothing can be saved and the report must call the point failed. "cancel": what a
# user or a preempting scheduler does (scancel: SIGCONT, SIGTERM, then SIGKILL after KillWait);
# treeffn saves a checkpoint and a preempted result.json, and a rerun continues from it.
KILL = {"strategy": "node", "seed": "1"}
CANCEL = {"strategy": "post_sum", "seed": "2"}


def slurm_stopper(cluster, index: int, how: str):
    def stop() -> None:
        if how == "cancel":
            array_job = next(j["array_job"] for j in cluster.jobs())
            subprocess.run(["scancel", f"{array_job}_{index}"], env=cluster.env, check=True)
            return
        # A running array task has a job id of its own; its step 0 is the training process.
        job_id = next(j["job"] for j in cluster.jobs() if j["task"] == str(index))
        out = subprocess.run(["scontrol", "listpids", job_id], env=cluster.env, check=True, capture_output=True,
                             text=True).stdout.splitlines()[1:]
        pids = [int(row.split()[0]) for row in out if row.split()[2] == "0"]
        assert pids, f"no step-0 processes in job {job_id}: {out}"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
    return stop


def local_stopper(sweep_dir: Path, index: int, how: str):
    """submitit's local executor: job id = the pid of a controller whose child runs the job."""
    from submitit.core.utils import DelayedSubmission

    def controller():
        for pickled in (sweep_dir / ".submitit").glob("*/*_submitted.pkl"):
            if DelayedSubmission.load(pickled).args[2] == index:  # args: overrides, dir key, job_num, ...
                return int(pickled.name.split("_")[0])
        return None

    def stop() -> None:
        pid = wait_for(controller, 60, f"local job {index}'s controller")
        children = Path(f"/proc/{pid}/task/{pid}/children")
        child = wait_for(lambda: children.exists() and children.read_text().split(), 60, "the job's process")
        os.kill(int(child[0]), signal.SIGKILL if how == "kill" else signal.SIGTERM)
    return stop


def stop_mid_training(victims: dict[Path, Callable[[], None]], timeout: float = 600) -> None:
    """Call each victim's stop() as soon as its first step checkpoint exists: mid-training, with
    ~50 of its 60 steps still to go, so a fast job cannot finish before it is stopped."""
    pending = dict(victims)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for run_dir, stop in list(pending.items()):
            if trained_checkpoints(run_dir):
                stop()
                del pending[run_dir]
        time.sleep(0.02)
    assert not pending, f"timed out waiting for {[d.name for d in pending]} to reach a checkpoint"


def local_jobs_done(sweep_dir: Path) -> bool:
    pids = [int(p.name) for p in (sweep_dir / ".submitit").iterdir() if p.name.isdigit()]
    return not any(Path(f"/proc/{pid}").exists() for pid in pids)


# ------------------------------------------------------------------------------ the test
@pytest.mark.parametrize("launcher", [pytest.param("slurm", marks=pytest.mark.slurm), "local_parallel"])
def test_kill_and_cancel_jobs_report_them_then_rerun_fills_them_in(launcher, request, tmp_path, cache_dir):
    if launcher == "slurm":
        cluster = request.getfixturevalue("cluster")
        env, args = {**cluster.env}, SLURM_HERE
    else:
        if not slurm_cluster.unavailable() and not os.environ.get("TREEFFN_TEST_LOCAL_PARALLEL"):
            pytest.skip("Slurm is here: the slurm variant covers this (TREEFFN_TEST_LOCAL_PARALLEL=1 runs it too)")
        env, args = {**os.environ, "OMP_NUM_THREADS": "1"}, LOCAL_PARALLEL  # 9 jobs at once on few cores
    env["TREEFFN_CACHE"] = str(cache_dir)
    sweep_dir = tmp_path / "runs" / "sweeps" / SMOKE
    started = time.monotonic()

    with open(tmp_path / "sweep1.log", "w") as log:
        first = subprocess.Popen(sweep_command(args), cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: (sweep_dir / "multirun.yaml").exists(), 120, "the sweep to start")
        sweep = rp.load_sweep(str(sweep_dir))
        index = {how: next(i for i, job in enumerate(sweep.jobs) if all(rp.job_values(job)[k] == v for k, v in
                                                                        values.items()))
                 for how, values in (("kill", KILL), ("cancel", CANCEL))}
        victim = {how: sweep_dir / rp.run_dir_name(sweep.jobs[i], sweep) for how, i in index.items()}
        if launcher == "slurm":
            wait_for(cluster.jobs, 120, "the sweep's array job")
            stop_mid_training({victim[h]: slurm_stopper(cluster, index[h], h) for h in index})
            wait_for(lambda: cluster.wait_empty(timeout=1), 900, "Slurm's queue to empty", step=1)
            # Accounting is off here, so submitit cannot see that the killed job ended: it would
            # wait for its result file forever. The jobs are all over; stop the launcher.
            first.terminate()
        else:
            stop_mid_training({victim[h]: local_stopper(sweep_dir, index[h], h) for h in index})
            wait_for(lambda: local_jobs_done(sweep_dir), 900, "the other local jobs", step=1)
        first.wait(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    first_pass_s = time.monotonic() - started
    killed, cancelled = victim["kill"], victim["cancel"]
    assert not (killed / "result.json").exists(), "the killed job wrote a result"
    preempted = json.loads((cancelled / "result.json").read_text())
    assert preempted["status"] == "preempted" and preempted["signal"] == "SIGTERM", preempted
    assert 10 <= preempted["steps"] < STEPS and (cancelled / "checkpoints" / "last.ckpt").exists()

    # The other seven jobs' records are intact: result.json finished, one whole index line each.
    points = rp.collect_points(sweep)
    others = [p for p in points if p.run_dir not in (killed, cancelled)]
    assert [p.status for p in others] == ["finished"] * 7, [(p.run_dir.name, p.status, p.detail) for p in others]
    lines = (sweep_dir / "index.jsonl").read_text().splitlines()
    records = {r["run_dir"]: r["status"] for r in read_index(sweep_dir / "index.jsonl")}
    assert len(records) == len(lines) == 8, lines
    assert records.pop(str(cancelled)) == "preempted" and set(records.values()) == {"finished"}
    assert str(killed) not in records

    text = report(tmp_path, env)
    assert "9 grid points: 1 failed, 7 finished, 1 preempted" in text
    assert "| 2/3 |" in table_row(text, "node") and "seed=1 failed" in table_row(text, "node")
    assert "| 2/3 |" in table_row(text, "post_sum") and "seed=2 preempted" in table_row(text, "post_sum")
    assert f"`{killed.name}`: **failed** — no result.json: the job was killed" in text
    assert f"`{cancelled.name}`: **preempted** — stopped by SIGTERM at step {preempted['steps']}" in text

    # Rerun the same command: the two stopped points are trained (the cancelled one continues from
    # its checkpoint), the finished runs are not.
    checkpoints = {p: p.stat().st_mtime_ns for o in others for p in (o.run_dir / "checkpoints").glob("*.ckpt")}
    assert len(checkpoints) >= 7
    started = time.monotonic()
    second = subprocess.run(sweep_command(args), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    rerun_s = time.monotonic() - started
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in checkpoints} == checkpoints, "a finished run was trained again"
    # The cancelled run continued: its first pass's CSV became an earlier part, and the rerun's
    # log starts past the step it was stopped at.
    csv_dir = cancelled / "logs" / "csv"
    assert (csv_dir / "metrics-part000.csv").exists()
    with (csv_dir / "metrics.csv").open() as f:
        first_step = int(next(csv.DictReader(f))["step"])
    assert first_step >= preempted["steps"], (first_step, preempted["steps"])
    for run_dir in (killed, cancelled):
        result = json.loads((run_dir / "result.json").read_text())
        assert result["status"] == "finished" and result["steps"] == STEPS, result

    text = report(tmp_path, env)
    assert "9 grid points: 9 finished" in text
    for strategy in ("dense", "node", "post_sum"):
        row = table_row(text, strategy)
        assert "| 3/3 |" in row and " ± " in row and row.rstrip().endswith("| ok |")
    print(f"\n[{launcher}] first pass (with the kill and the cancel) {first_pass_s:.0f} s, rerun {rerun_s:.0f} s")


def trained_checkpoints(run_dir):
    """Step checkpoints after training began (a tree run also keeps its step-0 weights)."""
    from treeffn.training.run_files import step_checkpoints

    return step_checkpoints(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else []
