"""The `treeffn` command: config printing without torch, clear errors, single and multi runs."""

import json
import subprocess
from pathlib import Path
import sys

import pytest

from tests.conftest import TINY, run_cli


def test_help_lists_the_verbs(tmp_path):
    out = run_cli(["--help"], cwd=tmp_path)
    assert out.returncode == 0 and "train" in out.stdout


def test_cfg_job_prints_the_config_without_importing_torch(tmp_path):
    code = (
        "import sys\n"
        "from treeffn.cli.main import main\n"
        "try:\n    main(['train', 'tree.depth=4', '--cfg', 'job'])\n"
        "except SystemExit:\n    pass\n"
        "print('TORCH_LOADED' if 'torch' in sys.modules else 'TORCH_NOT_LOADED')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "depth: 4" in out.stdout and "placement: node" in out.stdout
    assert out.stdout.strip().endswith("TORCH_NOT_LOADED")


@pytest.mark.parametrize("override, fragment", [
    ("tree.placement=middle", "tree.placement='middle' is not allowed; choose one of: node, post_sum"),
    ("tree.activation=swish2", "tree.activation='swish2' is not allowed"),
    ("tree.depth=-1", "tree.depth=-1 is not allowed"),
    ("tree.trees=0", "tree.trees=0 is not allowed"),
    ("data=files", "data.path is missing"),
])
def test_bad_overrides_fail_at_start_with_one_line(tmp_path, override, fragment):
    out = run_cli(["train", override, f"runs_root={tmp_path}/runs"], cwd=tmp_path, timeout=60)
    assert out.returncode == 2
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert lines == [f"treeffn train: error: {lines[0].split('error: ', 1)[1]}"] and fragment in lines[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.ckpt"))


def test_non_utf8_data_file_fails_at_start(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1") * 10)
    out = run_cli(["train", "data=files", f"data.path={bad}", f"runs_root={tmp_path}/runs"], cwd=tmp_path, timeout=120)
    assert out.returncode == 2
    assert "is not UTF-8 text" in out.stderr and str(bad) in out.stderr



@pytest.mark.slow
def test_multirun_runs_one_job_per_placement(tmp_path, cache_dir):
    out = run_cli(["train", "-m", "tree.placement=node,post_sum", "trainer.max_steps=5", "logger=csv",
                   "trainer.limit_val_batches=3", f"runs_root={tmp_path}/runs"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    results = sorted((tmp_path / "runs" / "multirun").glob("*/result.json"))
    placements = sorted(json.loads(p.read_text())["tree"]["placement"] for p in results)
    assert placements == ["node", "post_sum"]


@pytest.mark.slow
def test_opt125m_preset_runs_two_steps_and_reports_active_fraction(tmp_path, cache_dir):
    out = run_cli(["train", "model=opt125m", "tree.depth=6", "trainer.max_steps=2", "data.block_size=32", "data.batch_size=2",
                   "trainer.limit_val_batches=2", "logger=csv", f"runs_root={tmp_path}/runs"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "active FFN units per token: 168 of 3048 (5.5%)" in out.stdout
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("run dir: ")
    result = json.loads((tmp_path / last.removeprefix("run dir: ") / "result.json").read_text())
    assert result["steps"] == 2 and result["tree"]["trees"] == 24


@pytest.mark.slow
def test_dense_run_through_the_cli_with_wandb_offline(tmp_path, cache_dir):
    out = run_cli(["train", "tree=dense", *[o for o in TINY if not o.startswith("logger")], "logger=wandb",
                   "logger.mode=offline", "trainer.max_steps=5", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path,
                  env_extra={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "run")})
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "result.json").read_text())["ffn"] == "dense"
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*")), "no offline W&B run written"
    assert (tmp_path / "run" / "logs" / "csv" / "metrics.csv").exists()
    # nothing a user cannot act on: W&B's deprecation notice, transformers' per-file bars, the
    # FutureWarning Lightning's own code triggers in torch
    for noise in ("anonymous setting", "Writing model shards", "Loading weights", "LeafSpec", "Epoch 0/-2"):
        assert noise not in out.stdout + out.stderr, noise


@pytest.mark.parametrize("args, fragment", [
    (["model=opt9000"], "model=opt9000 is not a model preset; choose one of: gpt2_124m, gpt2_tiny, llama_1b, llama_tiny, opt1.3b, opt125m, "
                       "opt2.7b, opt350m, tiny"),
    (["-m", "model=tiny,opt9"], "model=opt9 is not a model preset"),
    (["tree.depht=3"], "tree.depht is not a config key; did you mean tree.depth"),
    (["tree=dense", "tree.depth=4"], "tree.depth is not a setting of tree=dense, so it would be ignored"),
])
def test_unknown_presets_and_keys_fail_with_one_line(tmp_path, args, fragment):
    out = run_cli(["train", *args, f"runs_root={tmp_path}/runs"], cwd=tmp_path, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"treeffn train: error: {out.stderr.split('error: ', 1)[1].strip()}"]
    assert fragment in out.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_design_card_command_runs_with_the_default_wandb_logger(tmp_path, cache_dir):
    """`treeffn train model=opt125m tree.depth=6` as a new user types it (a few steps, short
    blocks), with the default logger, W&B offline: 24 trees x 64 leaves once made a usage
    histogram of 1,536 bins, which W&B refuses (at most 512), and the run exited 1."""
    out = run_cli(["train", "model=opt125m", "tree.depth=6", "trainer.max_steps=2", "data.block_size=32",
                   "data.batch_size=2", "trainer.limit_val_batches=1", "checkpoint.every_n_steps=2"],
                  cwd=tmp_path, env_extra={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = Path(out.stdout.strip().splitlines()[-1].removeprefix("run dir: "))
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "finished" and result["tree"]["trees"] == 24 and result["tree"]["activation"] == "gelu"
    assert list((run_dir / "wandb").glob("offline-run-*")), "the default logger is W&B, offline without a key"
    config = (run_dir / "hf" / "config.json").read_text()
    assert '"activation_function": "relu"' in config  # OPT as published: ReLU in the (replaced) dense MLP
