"""The self-describing run dir: environment snapshot and the machine-readable result record."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

RESULT_FILE = "result.json"
RESULT_FORMAT = 1
PACKAGES = ("treeffn", "torch", "lightning", "transformers", "tokenizers", "datasets", "hydra-core",
            "omegaconf", "wandb", "numpy")


def write_text_atomic(path: Path, text: str) -> None:
    """Write then rename, so a reader (or a crash) never sees half a file. The temporary name
    holds the pid: processes writing the same file at once (a sweep's jobs filling one cache)
    each rename a whole file of their own."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: Path, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


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
