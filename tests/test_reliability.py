"""Reliability: exact resume after SIGKILL, preemption signals and Ctrl-C, non-finite steps, a
full disk, safe loading. (Hostile inputs: test_hostile.py; concurrent index writers:
test_results_index.py.)"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import TINY, run_cli

# Dropout on, so that the RNG state matters after a resume; deterministic kernels. A tiny step
# takes ~20 ms here: the runs a signal must stop mid-way have 45+ steps (~1 s) left after the
# checkpoint the test waits for, so a slow poll on a loaded machine still lands mid-run.
STEPS = 60
EXACT = [*TINY, "tree.depth=2", "model.dropout=0.1", "trainer.deterministic=true", "checkpoint.every_n_steps=5",
         "trainer.val_check_interval=10", f"trainer.max_steps={STEPS}"]


def start_cli(args, cwd):
    return subprocess.Popen([sys.executable, "-m", "treeffn.cli.main", *args], cwd=cwd, env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out")


def model_state(run_dir):
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return ckpt["state_dict"], ckpt["global_step"]


def logged_losses(run_dir):
    import csv

    losses = {}
    for path in sorted((run_dir / "logs" / "csv").glob("metrics*.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    losses[int(row["step"])] = float(row["train/loss"])
    return losses


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, cache_dir):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    out = run_cli(["train", *EXACT, f"hydra.run.dir={clean}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]

    proc = start_cli(["train", *EXACT, f"hydra.run.dir={killed}"], cwd=tmp_path)
    # Kill at a random point after a randomly chosen checkpoint step (not after a wall-clock
    # delay, so a fast idle machine cannot finish all its steps first). Only the newest step
    # checkpoint is kept, so wait for any at or past the target; from step 10 on, last.ckpt of
    # step 5 at least exists whenever the kill lands.
    target = random.choice([10, 15])
    wait_for(lambda: any(int(p.stem[4:]) >= target for p in (killed / "checkpoints").glob("step*.ckpt")), proc)
    time.sleep(random.uniform(0.0, 0.05))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    _, step_at_kill = model_state(killed)
    assert 5 <= step_at_kill < STEPS

    out = run_cli(["train", *EXACT, f"hydra.run.dir={killed}"], cwd=tmp_path)  # the same command
    assert out.returncode == 0, out.stderr[-2000:]
    clean_state, clean_step = model_state(clean)
    resumed_state, resumed_step = model_state(killed)
    assert clean_step == resumed_step == STEPS
    assert clean_state.keys() == resumed_state.keys()
    for key in clean_state:
        assert torch.equal(clean_state[key], resumed_state[key]), key  # bitwise
    clean_losses, resumed_losses = logged_losses(clean), logged_losses(killed)
    after = [s for s in resumed_losses if s > step_at_kill]
    assert after and all(resumed_losses[s] == clean_losses[s] for s in after)
    result = json.loads((killed / "result.json").read_text())
    assert result["steps"] == STEPS and result["tokens_seen"] == STEPS * 8 * 32


# A launcher that owns SIGUSR2, as submitit does (its handler requeues the job and exits).
LAUNCHER = """
import pathlib, signal, sys
marker = pathlib.Path(sys.argv[1])
def requeue(signum, frame):
    marker.write_text("requeued")
    sys.exit(0)
signal.signal(signal.SIGUSR2, requeue)
from treeffn.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_sigusr2_saves_then_goes_to_the_launchers_handler(tmp_path, cache_dir):
    run, marker = tmp_path / "run", tmp_path / "requeued.txt"
    args = ["train", *EXACT, f"hydra.run.dir={run}"]
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(marker), *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: trained_checkpoints(run), proc)
    proc.send_signal(signal.SIGUSR2)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and marker.read_text() == "requeued", stderr[-2000:]  # the launcher's exit
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "preempted" and result["signal"] == "SIGUSR2"
    _, saved_step = model_state(run)
    assert saved_step == result["steps"] and 5 <= saved_step < STEPS  # last.ckpt holds the step it stopped at


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_saves_and_the_rerun_continues(tmp_path, cache_dir, sig):
    run = tmp_path / "run"
    args = ["train", *[o for o in EXACT if not o.startswith("logger")], "logger=wandb",
            f"hydra.run.dir={run}"]
    proc = start_cli(args, cwd=tmp_path)
    wait_for(lambda: trained_checkpoints(run), proc)
    wandb_id = (run / "wandb_id.txt").read_text()
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr[-2000:]
    assert f"received {sig.name}" in stderr
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "preempted" and result["signal"] == sig.name
    _, saved_step = model_state(run)
    assert saved_step == result["steps"] and 5 <= saved_step < STEPS

    out = run_cli(args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((run / "result.json").read_text())["steps"] == STEPS
    assert (run / "wandb_id.txt").read_text() == wandb_id  # the same W&B run continues


@pytest.mark.slow
def test_non_finite_losses_skip_steps_then_stop(tmp_path, cache_dir):
    from tests.test_training import make_cfg
    from treeffn.training.train import train

    cfg = make_cfg(cache_dir, "tree.depth=2", "optim.lr=1e30", "optim.warmup_steps=0", "optim.grad_clip=0",
                   "trainer.max_steps=200", "guard.max_non_finite_steps=3")
    result = train(cfg, tmp_path / "run")
    assert result["status"] == "stopped_non_finite"
    assert "3 consecutive steps" in result["stop_reason"]
    assert result["skipped_non_finite_steps"] >= 3 and result["steps"] < 200
    state, _ = model_state(tmp_path / "run")
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@pytest.mark.slow
def test_corrupted_last_checkpoint_falls_back_to_the_previous_one(tmp_path, cache_dir):
    from tests.test_training import make_cfg
    from treeffn.training.train import train

    run = tmp_path / "run"
    train(make_cfg(cache_dir, "tree=dense", "trainer.max_steps=10", "checkpoint.keep_all=true"), run)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated
    with pytest.warns(UserWarning, match="could not be read"):
        result = train(make_cfg(cache_dir, "tree=dense", "trainer.max_steps=15", "checkpoint.keep_all=true"), run)
    assert result["steps"] == 15


# Hostile inputs (a table of refused commands): tests/test_hostile.py


def test_a_run_dir_in_use_is_refused(tmp_path):
    from treeffn.config import ConfigError
    from treeffn.training.run_files import hold_run_dir, release_run_dir

    code = ("import fcntl, sys, time\n"
            f"f = open({str(tmp_path / '.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.write('4242'); f.flush()\n"
            "print('locked', flush=True); time.sleep(30)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=r"in use by another treeffn process \(pid 4242\)"):
            hold_run_dir(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    hold_run_dir(tmp_path)  # free again once the holder is gone
    release_run_dir(tmp_path)


# ------------------------------------------------------------------ Ctrl-C, finished runs, printed run dirs
def train_loss_steps_by_part(run_dir) -> list[list[int]]:
    """Steps with a train/loss row in each CSV part, in the order the parts are read."""
    import csv

    folder = run_dir / "logs" / "csv"
    parts = [*sorted(folder.glob("metrics-part*.csv")), folder / "metrics.csv"]
    steps = []
    for path in parts:
        with open(path) as f:
            steps.append([int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")])
    return steps


def file_hashes(root) -> dict:
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_ctrl_c_saves_the_rerun_continues_and_a_finished_run_is_left_alone(tmp_path, cache_dir):
    runs = tmp_path / "runs"
    # The run dir is named from the overrides, as without hydra.run.dir: "=", "," and (for the
    # quoted note) "@" and a hash; whatever train prints must work as run= for the other verbs.
    args = ["train", *EXACT, "+note='ctrl c'", f"runs_root={runs}"]
    proc = start_cli(args, cwd=tmp_path)
    wait_for(lambda: any(trained_checkpoints(d) for d in runs.glob("*/")), proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "treeffn train: interrupted: received SIGINT" in stderr and "Traceback" not in stderr
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "interrupted" and result["signal"] == "SIGINT"
    _, saved_step = model_state(run)
    assert saved_step == result["steps"] and 5 <= saved_step < STEPS  # saved where it stopped, not at 0

    out = run_cli(args, cwd=tmp_path)  # the same command continues
    assert out.returncode == 0, out.stderr[-2000:]
    printed = out.stdout.strip().splitlines()[-1].removeprefix("run dir: ")
    assert printed == str(run) and "@" in run.name
    assert json.loads((run / "result.json").read_text())["steps"] == STEPS
    parts = train_loss_steps_by_part(run)
    assert len(parts) == 2 and parts[0][-1] < saved_step <= parts[1][0]  # the parts never overlap
    every = [s for part in parts for s in part]
    assert every == sorted(set(every))
    statuses = [json.loads(line)["status"] for line in (runs / "index.jsonl").read_text().splitlines()]
    assert statuses == ["interrupted", "finished"]

    before = file_hashes(runs)
    again = run_cli(args, cwd=tmp_path)  # finished: says so, does nothing else
    assert again.returncode == 0, again.stderr[-2000:]
    assert "holds this command's finished run" in again.stdout and "nothing to do" in again.stdout
    assert again.stdout.strip().splitlines()[-1] == f"run dir: {run}"
    assert file_hashes(runs) == before  # no new metrics row, no rewritten record, no index line

    # Hydra's parser used to reject this path ("=" in a value); prune and analyze parse the same
    # way after treeffn.cli.main.path_arguments (tests/test_run_dir.py), so one verb runs here.
    evaluated = run_cli(["eval", f"run={printed}", "tasks=[]", "texts=[validation]"], cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert json.loads((run / "eval.json").read_text())["perplexity"]["validation"]["ppl"] > 1


# The Preemption callback's signal handling, in a process of its own: the first Ctrl-C asks for a
# save after the current step, a second one ends the process at once (by SIGINT).
DOUBLE_CTRL_C = """
import os, signal, time
from treeffn.training.reliability import Preemption
p = Preemption("unused.ckpt")
p.setup(None, None, "fit")
os.kill(os.getpid(), signal.SIGINT)
time.sleep(0.2)
print("first:", p.received, flush=True)
os.kill(os.getpid(), signal.SIGINT)
time.sleep(5)
print("still running", flush=True)
"""


def test_a_second_ctrl_c_ends_the_process_at_once(tmp_path):
    out = subprocess.run([sys.executable, "-c", DOUBLE_CTRL_C], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.splitlines() == ["first: SIGINT"], (out.stdout, out.stderr[-2000:])
    assert "saving a checkpoint after this step (Ctrl-C again to quit now)" in out.stderr
    assert out.returncode == -signal.SIGINT


# ------------------------------------------------------------------ a full disk
def fill_filesystem(path) -> None:
    with open(path, "wb", buffering=0) as f:  # unbuffered: nothing left over to fail at close
        for chunk in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError:
                pass


def disk_full_scenario(root, mechanism: str) -> dict:
    """Train on ``root`` until the first checkpoint, make every bigger write fail (``tmpfs``: fill
    the small filesystem root is; ``rlimit``: limit the process's file size, so writes past 1 MiB
    fail with EFBIG), wait for the run to stop, free the space and run the same command again.
    Returns what the test checks."""
    import resource
    from pathlib import Path

    from treeffn.training.run_files import MARKER, checkpoint_is_readable, checkpoint_step, pick_resume_checkpoint

    root = Path(root)
    run = root / "run"
    args = ["train", *TINY, "tree.depth=2", f"trainer.max_steps={STEPS}", f"hydra.run.dir={run}"]
    proc = start_cli(args, cwd=root)
    wait_for(lambda: (run / "checkpoints" / "last.ckpt").exists(), proc)
    records = ("config.yaml", "command.json", "environment.json", MARKER)
    hashes = {name: file_hashes(run).get(name) for name in records}
    if mechanism == "tmpfs":
        fill_filesystem(root / "filler")
    else:
        _, hard = resource.prlimit(proc.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (1 << 20, hard))
    _, stderr = proc.communicate(timeout=300)
    checkpoints = sorted((run / "checkpoints").glob("*.ckpt"))
    resume_from = pick_resume_checkpoint(run / "checkpoints")
    failure = run / "failure.json"
    report = {
        "returncode": proc.returncode, "stderr": stderr,
        "unreadable_checkpoints": [p.name for p in checkpoints if not checkpoint_is_readable(p)],
        "temporaries": [str(p) for p in run.rglob(".*.tmp*")],
        "resume_step": checkpoint_step(resume_from) if resume_from else None,
        "records_unchanged": {name: file_hashes(run).get(name) == h for name, h in hashes.items()},
        "failure": json.loads(failure.read_text()) if failure.exists() else None,
    }
    if mechanism == "tmpfs":
        (root / "filler").unlink()
    rerun = run_cli(args, cwd=root)
    report.update(rerun_returncode=rerun.returncode, rerun_stderr=rerun.stderr[-2000:],
                  rerun_result=json.loads((run / "result.json").read_text()) if rerun.returncode == 0 else None,
                  steps_by_part=train_loss_steps_by_part(run) if rerun.returncode == 0 else None)
    return report


def mount_namespace_available() -> bool:
    unshare = shutil.which("unshare")
    if not unshare:
        return False
    probe = subprocess.run([unshare, "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
def test_a_full_disk_during_a_save_loses_nothing_and_the_rerun_continues(tmp_path, cache_dir):
    """Issue 18, case 3: a real 32 MiB tmpfs filled up mid-run (in a mount namespace of its own,
    which needs no root where user namespaces are allowed); otherwise the write failure is
    injected with a file-size limit on the training process."""
    mechanism = "tmpfs" if mount_namespace_available() else "rlimit"
    root = tmp_path / "disk"
    root.mkdir()
    scenario = [sys.executable, "-m", "tests.test_reliability", "disk_full", str(root), mechanism]
    if mechanism == "tmpfs":
        scenario = ["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size=32m tmpfs "{root}" && exec "$@"', "sh",
                    *scenario]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(scenario, cwd=repo, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    reason = "No space left on device" if mechanism == "tmpfs" else "File too large"
    assert report["returncode"] == 2, report["stderr"][-2000:]
    errors = [line for line in report["stderr"].splitlines() if line.startswith("treeffn train: error:")]
    assert len(errors) == 1 and "Traceback" not in report["stderr"], report["stderr"][-2000:]
    assert "cannot write" in errors[0] and reason in errors[0] and "is intact" in errors[0], errors[0]
    assert report["unreadable_checkpoints"] == [] and report["temporaries"] == []  # nothing cut off
    assert report["resume_step"] is not None and report["resume_step"] >= 5
    assert all(report["records_unchanged"].values()), report["records_unchanged"]
    if mechanism == "rlimit":  # on the full tmpfs even this small file may not fit
        assert report["failure"]["status"] == "failed" and reason in report["failure"]["error"]
    assert report["rerun_returncode"] == 0, report["rerun_stderr"]
    assert report["rerun_result"]["steps"] == STEPS
    first, *rest = report["steps_by_part"]
    assert rest and rest[-1][0] >= report["resume_step"]  # continued from the checkpoint, not from step 0
    every = [s for part in report["steps_by_part"] for s in part]
    assert every == sorted(set(every))


@pytest.mark.slow
def test_a_failed_export_keeps_the_last_good_result_and_hf_dir(tmp_path, cache_dir, monkeypatch):
    """Issue 18, case 3: a full disk at the final Hugging Face save used to leave hf/ with a new
    config.json and old weights, and a failed record in place of result.json."""
    import errno

    from tests.test_training import make_cfg
    from treeffn.training.train import StorageError, train

    run = tmp_path / "run"
    train(make_cfg(cache_dir, "tree=dense", "trainer.max_steps=5"), run)
    good = {k: v for k, v in file_hashes(run).items() if k == "result.json" or k.startswith("hf/")}

    def save_then_disk_full(model, tokenizer, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("treeffn.models.hf.save_hf", save_then_disk_full)
    with pytest.raises(StorageError, match="No space left on device.*newest good checkpoint"):
        train(make_cfg(cache_dir, "tree=dense", "trainer.max_steps=10"), run)
    assert {k: v for k, v in file_hashes(run).items() if k in good} == good
    assert not [p for p in run.rglob(".*") if ".tmp" in p.name or ".old" in p.name]
    failure = json.loads((run / "failure.json").read_text())
    assert failure["status"] == "failed" and "No space left on device" in failure["error"]
    assert json.loads((run / "result.json").read_text())["status"] == "finished"  # the last good record

    monkeypatch.undo()
    assert train(make_cfg(cache_dir, "tree=dense", "trainer.max_steps=10"), run)["steps"] == 10
    assert not (run / "failure.json").exists()  # the newest attempt succeeded


if __name__ == "__main__":  # python -m tests.test_reliability disk_full <root> <tmpfs|rlimit>
    if sys.argv[1] == "disk_full":
        print(json.dumps(disk_full_scenario(sys.argv[2], sys.argv[3])))


def trained_checkpoints(run_dir):
    """Step checkpoints after training began (a tree run also keeps its step-0 weights)."""
    from treeffn.training.run_files import step_checkpoints

    return step_checkpoints(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else []
