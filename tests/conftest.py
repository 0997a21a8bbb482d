import os
import sys
from pathlib import Path

import pytest

# Every test runs offline with its own cache, so nothing touches the user's ~/.cache.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs one worker per core (pyproject addopts): one thread each, for the worker
    # and the CLI processes it starts, instead of every process spreading over every core.
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("treeffn-cache")
    os.environ["TREEFFN_CACHE"] = str(path)
    return path


# A model and run small enough for a few seconds of CPU.
TINY = [
    "model.hidden_size=32", "model.ffn_dim=64", "model.num_hidden_layers=1", "model.num_attention_heads=2",
    "model.word_embed_proj_dim=32", "data.block_size=32", "data.batch_size=8",
    "trainer.val_check_interval=10", "trainer.limit_val_batches=4", "trainer.log_every_n_steps=5",
    "checkpoint.every_n_steps=5", "logger=csv",
]


def run_cli(args, cwd, env_extra=None, timeout=300):
    import subprocess

    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "treeffn.cli.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
