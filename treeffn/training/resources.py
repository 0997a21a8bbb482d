"""Whether this machine can run a config at all: how many training processes it starts, and
whether the FFN weights, optimizer state and training-path activations fit in memory. Imports
torch (to see the GPUs) but not Lightning, so a refusal comes before the heavy imports."""

from __future__ import annotations

import os

import torch

from treeffn.config import ConfigError, check_training_memory, machine_memory_bytes


def requested_processes(trainer_cfg: dict) -> int:
    """Processes per node that trainer.devices asks for (``auto``/-1: every GPU, or 1 on CPU)."""
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, list):
        return len(devices)
    if devices in ("auto", -1):
        if trainer_cfg.get("accelerator") == "cpu" or not torch.cuda.is_available():
            return 1
        return torch.cuda.device_count()
    return int(devices)


def check_machine_fits(cfg: dict, precision: str) -> None:
    """Refuse, before anything is built, more CPU processes than the machine has cores, and a
    model whose FFN weights, optimizer state and training-path activations exceed the memory of
    one GPU (on GPUs) or of the machine (on the CPU, shared by all its processes)."""
    t = cfg["trainer"]
    on_gpu = t.get("accelerator") in ("gpu", "cuda") or (t.get("accelerator") == "auto" and torch.cuda.is_available())
    bytes_per_value = 2 if "16" in str(precision) else 4
    if on_gpu and torch.cuda.is_available():
        check_training_memory(cfg, torch.cuda.get_device_properties(0).total_memory, "one GPU", bytes_per_value)
        return
    processes = requested_processes(t)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if processes > cores:
        raise ConfigError(f"trainer.devices={t.get('devices')} starts {processes} training processes on the CPU, but "
                          f"this machine has {cores} CPU cores; use trainer.devices={cores} or fewer")
    check_training_memory(cfg, machine_memory_bytes(), "this machine", bytes_per_value, processes)
