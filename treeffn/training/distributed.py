"""Running one training job on several processes: strategies, the global batch, ranks.

What lives here, and why:

* ``make_strategy``: ``trainer.strategy`` -> a Lightning strategy. DDP never broadcasts
  buffers (the tree layers' ``node_visits`` are per-rank counters that RoutingStats sums
  across ranks; broadcasting would overwrite them with rank 0's). FSDP wraps each decoder
  layer (attention + tree layer) as one unit and saves full, unsharded checkpoints.
* ``accumulation``: ``optim.global_batch_tokens`` -> gradient accumulation steps, so one
  optimizer step trains on the same tokens on 1 or 16 GPUs.
* ``is_global_zero``: whether this process may write the run dir records.
* ``rank_command`` / ``launched_ranks``: what Lightning needs to start the other ranks of a
  Hydra job correctly (its launcher re-runs this process's command line), and the cleanup
  after the job. Under Slurm (srun) or torchrun the ranks exist already and none of it applies.
* ``RankSeed``: a different random stream (dropout) on every rank.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys

import lightning as L
import numpy as np
import torch

from treeffn.config import ConfigError
from treeffn.training.resources import requested_processes

# Set by launchers for every process but the first: Lightning's own (LOCAL_RANK, NODE_RANK),
# torchrun (RANK, GROUP_RANK), Slurm's srun (SLURM_PROCID).
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")
# What Lightning's process launcher writes into the first process's environment.
LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS")


def is_global_zero() -> bool:
    """True in the process of global rank 0, before and after the process group exists."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) != 0:  # set by the strategy once training is set up
        return False
    return all(os.environ.get(name, "0").strip() in ("", "0") for name in RANK_VARIABLES)


# ------------------------------------------------------------------------------ global batch
def accumulation(cfg: dict, world_size: int) -> int:
    """Gradient accumulation steps: trainer.accumulate_grad_batches, or the number that makes
    every optimizer step train on optim.global_batch_tokens tokens over ``world_size`` ranks."""
    tokens = cfg["optim"].get("global_batch_tokens")
    if tokens is None:
        return int(cfg["trainer"].get("accumulate_grad_batches", 1))
    b, block = cfg["data"]["batch_size"], cfg["data"]["block_size"]
    per_round = b * block * world_size
    if tokens % per_round:
        raise ConfigError(f"optim.global_batch_tokens={tokens} is not a multiple of data.batch_size x data.block_size "
                          f"x ranks = {b} x {block} x {world_size} = {per_round}; use a multiple of {per_round}")
    return tokens // per_round


def check_resume_batch(ckpt, global_blocks: int, block_size: int) -> None:
    """Refuse to continue a checkpoint trained with another global batch: the data position
    (global_step x global batch) and the token count would both be off."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True).get("TextDataModule") or {}
    theirs = state.get("global_batch_blocks")
    if theirs is not None and (theirs, state.get("block_size")) != (global_blocks, block_size):
        raise ConfigError(f"checkpoint {ckpt} was trained with global batches of {theirs} blocks of "
                          f"{state.get('block_size')} tokens ({theirs * state.get('block_size'):,} tokens); this run "
                          f"has {global_blocks} of {block_size} ({global_blocks * block_size:,}); set "
                          f"optim.global_batch_tokens={theirs * state.get('block_size')} to continue it")


# ------------------------------------------------------------------------------ strategies
def fsdp_units(model: torch.nn.Module) -> set[type]:
    """The module classes FSDP wraps as units: the decoder layer class of the model's family
    (each holds attention, norms and its tree layer, which is gathered with it)."""
    from treeffn.models.swap import model_family

    return {model_family(model).load("layer_class")}


def make_strategy(trainer_cfg: dict, model: torch.nn.Module, precision: str):
    """The Lightning strategy for trainer.strategy; "auto" stays Lightning's choice for one device."""
    name = trainer_cfg.get("strategy", "auto")
    if name == "auto" and requested_processes(trainer_cfg) * int(trainer_cfg.get("num_nodes", 1)) > 1:
        name = "ddp"  # what Lightning would pick, with our DDP settings
    if name in ("ddp", "fsdp"):
        quiet_reduced_metric_warnings()
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        ddp = trainer_cfg.get("ddp") or {}
        return DDPStrategy(find_unused_parameters=bool(ddp.get("find_unused_parameters", False)),
                           **{no_buffer_sync_argument(): False})
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        fsdp = trainer_cfg.get("fsdp") or {}
        units = fsdp_units(model)
        mixed = None
        if precision == "bf16-mixed":
            from torch.distributed.fsdp import MixedPrecision

            # bf16 compute, fp32 gradient reduction: closer to the one-GPU run (fp32 grads) than
            # Lightning's default of reducing in bf16.
            mixed = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                   buffer_dtype=torch.float32)
        return FSDPStrategy(auto_wrap_policy=units,
                            activation_checkpointing_policy=units if fsdp.get("activation_checkpointing") else None,
                            sharding_strategy=fsdp.get("sharding_strategy", "FULL_SHARD"),
                            mixed_precision=mixed, state_dict_type="full", use_orig_params=True,
                            limit_all_gathers=bool(fsdp.get("limit_all_gathers", True)))
    return "auto"


def no_buffer_sync_argument() -> str:
    """DDP's switch for "do not broadcast rank 0's buffers before every forward" (renamed in
    newer torch; both leave the buffers as they are at init, equal on every rank then)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    params = inspect.signature(DistributedDataParallel.__init__).parameters
    return "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"


def quiet_reduced_metric_warnings() -> None:
    """Lightning suggests sync_dist=True for every epoch-level value; ours are reduced across
    ranks before they are logged (torchmetrics, RoutingStats), so the advice does not apply."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting.*")


def is_fsdp(trainer) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(trainer.strategy, FSDPStrategy)


# ------------------------------------------------------------------------------ launching ranks
def spawns_ranks(trainer) -> bool:
    """Whether Lightning will start this node's other ranks itself (rather than torchrun/srun)."""
    env = getattr(trainer.strategy, "cluster_environment", None)
    return trainer.world_size > 1 and env is not None and not env.creates_processes_externally


START_RANKS_HINT = ("this many devices needs more processes, which Lightning starts by re-running the command: "
                    "start training with `treeffn train ...`, or start every rank yourself (torchrun, srun)")


def rank_command(trainer) -> list[str] | None:
    """sys.argv for Lightning's launcher when it will start this node's other ranks, else None.

    Lightning starts rank i as ``python <argv[0] or -m module> <argv[1:]> hydra.run.dir=<run.dir>
    ...``. Our argv at that point is ``["treeffn train", <all overrides>]``: no runnable
    program, no verb, and under ``-m`` the whole sweep. Give it this job's own overrides and
    the entry point this process was started through. A ConfigError when there is none (called
    before anything is written, so a refused command leaves nothing behind).
    """
    if not spawns_ranks(trainer):
        return None
    import __main__
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise ConfigError(START_RANKS_HINT)
    overrides = list(HydraConfig.get().overrides.task)
    spec = getattr(__main__, "__spec__", None)
    if spec is not None and spec.name == "treeffn.cli.train":  # python -m treeffn.cli.train ...
        return [sys.argv[0], *overrides]
    if spec is not None and spec.name == "treeffn.cli.main":  # python -m treeffn.cli.main train ...
        return [sys.argv[0], "train", *overrides]
    # The `treeffn` console script: its __main__ holds main from treeffn.cli.main (named, not
    # imported: the library does not import the command line).
    if spec is None and getattr(getattr(__main__, "main", None), "__module__", None) == "treeffn.cli.main":
        return [os.path.abspath(__main__.__file__), "train", *overrides]
    raise ConfigError(START_RANKS_HINT)


@contextlib.contextmanager
def launched_ranks(command: list[str] | None):
    """Around fit/validate. With ``command`` (from rank_command): makes Lightning's launcher
    start the other ranks with it; afterwards ends the process group and restores what the
    launcher set, so that the next job of a Hydra sweep in this process starts its own ranks."""
    saved_argv, saved_env, threads = list(sys.argv), {k: os.environ.get(k) for k in LAUNCHER_VARIABLES}, None
    hydra_run = None
    if command is not None:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import open_dict, read_write

        sys.argv = command
        # Lightning names hydra.run.dir for the new ranks; in a sweep that must be this job's
        # output dir (hydra.sweep.dir/subdir), not the single-run pattern.
        hydra_cfg = HydraConfig.get()
        hydra_run = hydra_cfg.run.dir
        with read_write(hydra_cfg), open_dict(hydra_cfg):
            hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
        threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if command is not None:
            sys.argv = saved_argv
            from hydra.core.hydra_config import HydraConfig
            from omegaconf import open_dict, read_write

            hydra_cfg = HydraConfig.get()
            with read_write(hydra_cfg), open_dict(hydra_cfg):
                hydra_cfg.run.dir = hydra_run
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ seeds
class RankSeed(L.Callback):
    """Reseeds Python, NumPy and torch (dropout) at the start of training with a seed from
    (seed, global rank, global step) when there are several ranks: the same config gives the
    same draws, and no two ranks draw the same dropout masks. One rank keeps the RNG state the
    checkpoint restored (exact resume: treeffn.training.reliability.RNGState)."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.world_size == 1:
            return
        mixed = (self.seed * 1_000_003 + trainer.global_rank * 7_919 + trainer.global_step) % 2**32
        random.seed(mixed)
        np.random.seed(mixed)
        torch.manual_seed(mixed)  # every device's generator too
