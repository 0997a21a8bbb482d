import os
import sys
from pathlib import Path

import pytest

# Every test runs offline with its own cache, so nothing touches the user's ~/.cache.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton's interpreter (TRITON_INTERPRET=1) runs the kernel tests without a GPU. Triton reads the
# flag when a kernel is defined, its own library's included, so it must be set before the first
# `import triton` of the process, and collecting almost any test module imports Triton (through
# Lightning or transformers). So it is set here, before collection; the session fixture below takes
# it out of the environment again while the tests run (tree.impl=triton must still be refused on a
# CPU, and the CLI processes tests start must not inherit it), and tests/test_kernels.py sets it
# for each of its own tests. Importing torch does not import Triton.
import torch  # noqa: E402

INTERPRETER_SET_HERE = not torch.cuda.is_available() and "triton" not in sys.modules and \
    os.environ.get("TRITON_INTERPRET") is None
if INTERPRETER_SET_HERE:
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session", autouse=True)
def _interpreter_only_for_the_kernel_tests():
    if INTERPRETER_SET_HERE:
        os.environ.pop("TRITON_INTERPRET", None)
    yield


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
