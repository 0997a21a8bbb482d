"""A smoke sweep through a real Slurm cluster: kill one job, report, rerun, report.

The `slurm` variant starts a one-node cluster on this machine (tests/slurm_cluster.py: Debian's
slurm-wlm + munge, root) and submits table_strategies_opt125m_smoke through
hydra/launcher=slurm_1gpu (sbatch arrays). Where Slurm is absent it is skipped with the reason,
and the `local_parallel` variant runs the same steps through submitit's local launcher (one
subprocess per job) instead; set TREEFFN_TEST_LOCAL_PARALLEL=1 to run that one beside Slurm.

What must hold (issue 5): killing one job leaves the other jobs' records intact and the report
shows that point as failed; rerunning the same command fills it in without retraining the
finished runs; the final report has rows dense / node / post_sum with three seeds each.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import slurm_cluster
from tests.test_sweeps import SMOKE, TINY_SWEEP
from treeffn.results import report as rp
from treeffn.results.index import read_index

pytestmark = pytest.mark.slow

VICTIM = {"strategy": "node", "seed": "1"}
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
    return [sys.executable, "-m", "treeffn.cli.main", "train", "-m", f"sweep={SMOKE}", *launcher_args, *TINY_SWEEP]


def report(cwd: Path, env: dict) -> str:
    out = subprocess.run([sys.executable, "-m", "treeffn.cli.main", "report", f"sweep={SMOKE}", "plots=false"],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def table_row(text: str, strategy: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {strategy} |"))


# ------------------------------------------------------------------------------ killing one job
def kill_slurm_job(cluster, index: int, started) -> None:
    """SIGKILL the job's processes the way a user would: scancel --signal=KILL <array>_<task>,
    as soon as ``started()`` is true. The array job id is looked up before, so the kill costs
    one scancel, not a queue poll: a 6-step tiny job on an idle machine is over in seconds."""
    array_job = wait_for(lambda: next((j["array_job"] for j in cluster.jobs()), None), 120, "the sweep's array job")
    wait_for(started, 600, f"array task {index} to start", step=0.02)
    subprocess.run(["scancel", "--signal=KILL", f"{array_job}_{index}"], env=cluster.env, check=True)


def kill_local_job(sweep_dir: Path, index: int) -> None:
    """submitit's local executor: job id = the pid of a controller whose child runs the job."""
    from submitit.core.utils import DelayedSubmission

    def controller():
        for pickled in (sweep_dir / ".submitit").glob("*/*_submitted.pkl"):
            if DelayedSubmission.load(pickled).args[2] == index:  # args: overrides, dir key, job_num, ...
                return int(pickled.name.split("_")[0])
        return None

    pid = wait_for(controller, 120, f"local job {index} to be submitted")
    children = Path(f"/proc/{pid}/task/{pid}/children")
    child = wait_for(lambda: children.exists() and children.read_text().split(), 60, "the job's process")
    os.kill(int(child[0]), signal.SIGKILL)


def local_jobs_done(sweep_dir: Path) -> bool:
    pids = [int(p.name) for p in (sweep_dir / ".submitit").iterdir() if p.name.isdigit()]
    return not any(Path(f"/proc/{pid}").exists() for pid in pids)


# ------------------------------------------------------------------------------ the test
@pytest.mark.parametrize("launcher", [pytest.param("slurm", marks=pytest.mark.slurm), "local_parallel"])
def test_kill_one_job_report_it_failed_then_rerun_fills_it_in(launcher, request, tmp_path, cache_dir):
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
        index = next(i for i, job in enumerate(sweep.jobs)
                     if all(rp.job_values(job)[k] == v for k, v in VICTIM.items()))
        victim = sweep_dir / rp.run_dir_name(sweep.jobs[index], sweep)
        if launcher == "slurm":
            kill_slurm_job(cluster, index, started=victim.exists)
            wait_for(lambda: cluster.wait_empty(timeout=1), 900, "Slurm's queue to empty", step=1)
            # Accounting is off here, so submitit cannot see that the killed job ended: it would
            # wait for its result file forever. The jobs are all over; stop the launcher.
            first.terminate()
        else:
            wait_for(victim.exists, 600, "the victim job to start", step=0.05)
            kill_local_job(sweep_dir, index)
            wait_for(lambda: local_jobs_done(sweep_dir), 900, "the other local jobs", step=1)
        first.wait(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    first_pass_s = time.monotonic() - started
    assert not (victim / "result.json").exists(), "the victim finished before it could be killed"

    # The other eight jobs' records are intact: result.json finished, one whole index line each.
    points = rp.collect_points(sweep)
    others = [p for p in points if p.run_dir != victim]
    assert [p.status for p in others] == ["finished"] * 8, [(p.run_dir.name, p.status, p.detail) for p in others]
    lines = (sweep_dir / "index.jsonl").read_text().splitlines()
    records = read_index(sweep_dir / "index.jsonl")
    assert len(records) == len(lines) == 8 and {r["status"] for r in records} == {"finished"}
    assert str(victim) not in {r["run_dir"] for r in records}

    text = report(tmp_path, env)
    assert "9 grid points: 1 failed, 8 finished" in text
    assert "| 2/3 |" in table_row(text, "node") and "seed=1 failed" in table_row(text, "node")
    assert f"`{victim.name}`: **failed** — no result.json: the job was killed" in text

    # Rerun the same command: the victim is trained, the finished runs are not.
    checkpoints = {p: p.stat().st_mtime_ns for o in others for p in (o.run_dir / "checkpoints").glob("*.ckpt")}
    assert len(checkpoints) >= 8
    started = time.monotonic()
    second = subprocess.run(sweep_command(args), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    rerun_s = time.monotonic() - started
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in checkpoints} == checkpoints, "a finished run was trained again"
    result = json.loads((victim / "result.json").read_text())
    assert result["status"] == "finished" and result["steps"] == 6

    text = report(tmp_path, env)
    assert "9 grid points: 9 finished" in text
    for strategy in ("dense", "node", "post_sum"):
        row = table_row(text, strategy)
        assert "| 3/3 |" in row and " ± " in row and row.rstrip().endswith("| ok |")
    print(f"\n[{launcher}] first pass (with the kill) {first_pass_s:.0f} s, rerun {rerun_s:.0f} s")
