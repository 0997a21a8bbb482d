"""Reliability: exact resume after SIGKILL, preemption signals, non-finite steps, hostile inputs
and safe loading. (Concurrent index writers: test_results_index.py.)"""

import json
import os
import pickle
import random
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
    wait_for(lambda: any((run / "checkpoints").glob("step*.ckpt")), proc)
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
    wait_for(lambda: any((run / "checkpoints").glob("step*.ckpt")), proc)
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


# ------------------------------------------------------------------ hostile inputs
@pytest.fixture(scope="module")
def hostile(tmp_path_factory, cache_dir):
    """Files for the hostile-input table, and a finished dense run whose dir must stay intact."""
    from tests.test_training import make_cfg
    from treeffn.training.train import train

    root = tmp_path_factory.mktemp("hostile")
    (root / "empty.txt").write_bytes(b"")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (root / "latin1.txt").write_bytes("d\xe9j\xe0 vu\n".encode("latin-1") * 20)
    (root / "no_tokenizer").mkdir()
    dense_run = root / "dense_run"
    train(make_cfg(cache_dir, "tree=dense", "trainer.max_steps=5"), dense_run)
    ckpt = dense_run / "checkpoints" / "last.ckpt"
    (root / "truncated.ckpt").write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {root / 'PWNED'}",))

    with open(root / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    newer = root / "newer_run"
    newer.mkdir()
    (newer / "environment.json").write_text(json.dumps({"versions": {"treeffn": "99.0.0"}}))
    return root


HOSTILE = [
    (["model=gpt7"], "model=gpt7 is not a model preset"),
    (["tree.depth=-3"], "tree.depth=-3 is not allowed"),
    (["tree.depth=1000"], "tree.depth=1000 is not allowed"),
    (["tree.trees=0"], "tree.trees=0 is not allowed"),
    (["tree.placement=diagonal"], "tree.placement='diagonal' is not allowed"),
    (["tree.activation=softmax"], "tree.activation='softmax' is not allowed"),
    (["data.block_size=100000"], "data.block_size=100000 is larger than model.max_position_embeddings"),
    (["data=files", "data.path={root}/missing.txt"], "no such file, folder or glob match"),
    (["data=files", "data.path={root}/empty.txt"], "empty.txt is empty"),
    (["data=files", "data.path={root}/binary.txt"], "looks binary"),
    (["data=files", "data.path={root}/latin1.txt"], "is not UTF-8 text"),
    (["data.tokenizer={root}/no_tokenizer"], "folder has no tokenizer files"),
    (["tree.depth=2", "resume={root}/dense_run/checkpoints/last.ckpt"], "is of another architecture"),
    (["tree=dense", "resume={root}/truncated.ckpt"], "cannot be read"),
    (["tree=dense", "resume={root}/evil.ckpt"], "cannot be read"),
    (["tree=dense", "resume={root}/nothing.ckpt"], "no such checkpoint file"),
    (["hydra.run.dir={root}/newer_run"], "written by treeffn 99.0.0, newer than this treeffn"),
    (["tree.dept=3"], "tree.dept is not a config key; did you mean tree.depth"),
    (["optim.lr=-1"], "optim.lr=-1 is not allowed"),
    (["tree.depth=2", "hydra.run.dir={root}/dense_run"], "holds a run with different tree"),
]


@pytest.mark.slow
@pytest.mark.parametrize("args, fragment", HOSTILE, ids=[" ".join(a) for a, _ in HOSTILE])
def test_hostile_input_fails_before_training_and_overwrites_nothing(hostile, args, fragment):
    root = hostile
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    args = [a.format(root=root) for a in args]
    fresh = root / "fresh_run"
    run_dir = [] if any(a.startswith("hydra.run.dir") for a in args) else [f"hydra.run.dir={fresh}"]
    out = run_cli(["train", *TINY, *args, *run_dir], cwd=root, timeout=180)
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    lines = [line for line in out.stderr.splitlines() if line.startswith("treeffn train: error:")]
    assert len(lines) == 1 and fragment in lines[0], out.stderr[-2000:]
    after = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert after == before  # nothing existing overwritten, nothing new written
    assert not fresh.exists()
    assert not (root / "PWNED").exists()  # loading never ran code from the checkpoint


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
