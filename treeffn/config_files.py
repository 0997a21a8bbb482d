"""What the library knows of the config files (conf/, sweeps/) without Hydra running.

* ``group_choices``: the presets of a config group (``conf/<group>/*.yaml``, ``sweeps/<group>/*.yaml``).
* ``run_name``: the run-dir name conf/config.yaml gives a command (``hydra.run.dir`` and
  ``hydra.sweep.subdir`` call it through the ``treeffn_run_name`` resolver, which the command
  line registers), and which ``treeffn report`` recomputes to find a sweep's runs.
* ``gpu_of_job``: the GPU of one job of a sweep sharing a host's GPUs (conf/trainer/gpu_shared.yaml,
  through the ``treeffn_gpu_of_job`` resolver).

Pure Python, like treeffn/config.py: the command line imports it before anything heavy.
"""

from __future__ import annotations

import hashlib
import re
from importlib import resources

# The config roots: conf/, then sweeps/ (hydra.searchpath in conf/config.yaml; groups sweep, strategy).
CONFIG_PACKAGES = ("treeffn.conf", "treeffn.sweeps")


def group_choices(group: str) -> list[str]:
    """Option names of a config group (<root>/<group>/*.yaml in any config root)."""
    names: set[str] = set()
    for package in CONFIG_PACKAGES:
        folder = resources.files(package).joinpath(group)
        if folder.is_dir():
            names.update(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))
    return sorted(names)


def run_name(override_dirname: str) -> str:
    """Run-dir name from the command's overrides: the same command, the same run dir, and two
    different commands never one. Characters a folder name should not carry become ``_``; when
    that loses information (or the name is cut at 200 characters), ``@`` and a hash of the
    whole overrides follow. A clean name never contains ``@``, so hashed names cannot collide
    with clean ones."""
    original = override_dirname or ""
    name = re.sub(r"[^A-Za-z0-9_.,=+-]+", "_", original).strip("_")
    if name != original or len(name) > 200:
        name = f"{name[:189]}@{hashlib.sha256(original.encode()).hexdigest()[:10]}"
    return name or "default"


def gpu_of_job(job_num: int | None = None, gpus: int | None = None) -> list[int]:
    """``trainer.devices`` for job ``job_num`` of a sweep (Hydra's job number; 0 outside a sweep)
    sharing the GPUs this process can see: ``[job_num mod gpus]``."""
    if job_num is None:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        job_num = OmegaConf.select(HydraConfig.get(), "job.num", default=0) if HydraConfig.initialized() else 0
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count()
    if gpus < 1:
        raise ValueError("trainer=gpu_shared needs a GPU, and this process sees none (CUDA_VISIBLE_DEVICES, "
                         "hydra.launcher.gpus_per_node)")
    return [int(job_num or 0) % gpus]
