"""The self-describing run dir: environment snapshot and the machine-readable result record."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path


RESULT_FILE = "result.json"
FAILURE_FILE = "failure.json"  # the newest attempt's error, beside the last good result.json
RESULT_FORMAT = 1
PACKAGES = ("treeffn", "torch", "lightning", "transformers", "tokenizers", "datasets", "hydra-core",
            "omegaconf", "wandb", "numpy")


def git_revision() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment_snapshot() -> dict:
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    hardware = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        hardware["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"git_revision": git_revision(), "versions": versions, "hardware": hardware}


def read_result(run_dir: Path) -> dict | None:
    path = Path(run_dir) / RESULT_FILE
    return json.loads(path.read_text()) if path.exists() else None


def wandb_mode(setting: str) -> str:
    """logger.mode as W&B takes it: "auto" is online where W&B has credentials
    (WANDB_MODE, WANDB_API_KEY or a ~/.netrc entry), offline elsewhere. Training and
    ``treeffn eval`` (which adds its metrics to the run's W&B run) both read it here."""
    if setting != "auto":
        return setting
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"
