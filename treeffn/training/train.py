"""``treeffn train``: one training run from a composed config to a finished run dir.

Run dir layout:
    config.yaml          resolved config of this run
    command.json         the command line and its Hydra overrides
    environment.json     git revision, package versions, hardware
    checkpoints/         last.ckpt plus periodic step checkpoints
    logs/csv/metrics*.csv, wandb/   logged metrics
    result.json          the machine-readable result record
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from treeffn.config import ConfigError, resolve_trees, validate_train_config
from treeffn.results.record import RESULT_FORMAT, environment_snapshot, write_json_atomic, write_text_atomic

class Preempted(RuntimeError):
    """The run stopped on a signal after saving a checkpoint; the same command continues it."""

    def __init__(self, message: str, signal_name: str | None = None):
        super().__init__(message)
        self.signal_name = signal_name


# Keys whose change makes a different experiment: resuming across them is refused.
IDENTITY_KEYS = ("model", "tree", "data", "seed")


def find_resume_checkpoint(cfg: dict, run_dir: Path) -> Path | None:
    from treeffn.training.run_files import pick_resume_checkpoint

    folder = run_dir / "checkpoints"
    resume = cfg["resume"]
    if resume == "never":
        if any(folder.glob("*.ckpt")):
            raise ConfigError(f"run dir {run_dir} already holds checkpoints; pass resume=auto to continue it "
                              f"or choose another hydra.run.dir")
        return None
    if resume == "auto":
        return pick_resume_checkpoint(folder)
    path = Path(resume).expanduser()
    if not path.is_file():
        raise ConfigError(f"resume={resume}: no such checkpoint file")
    return path


def check_written_by_older_treeffn(run_dir: Path) -> None:
    """A run dir from a newer treeffn may hold records this version misreads: refuse it."""
    import json

    from treeffn import __version__

    env = run_dir / "environment.json"
    if not env.exists():
        return
    try:
        theirs = json.loads(env.read_text())["versions"]["treeffn"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{env} is unreadable; this run dir was not written by a finished treeffn start") from None
    if theirs and _version_tuple(theirs) > _version_tuple(__version__):
        raise ConfigError(f"run dir {run_dir} was written by treeffn {theirs}, newer than this treeffn "
                          f"{__version__}; upgrade treeffn or choose another hydra.run.dir")


def _version_tuple(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in version.split("+")[0].split("."))


def check_same_experiment(cfg: dict, run_dir: Path) -> None:
    """Refuse to continue a run dir whose saved config is a different experiment."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        return
    from omegaconf import OmegaConf

    saved = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True)
    changed = [k for k in IDENTITY_KEYS if saved.get(k) != cfg.get(k)]
    if changed:
        raise ConfigError(f"run dir {run_dir} holds a run with different {', '.join(changed)}; "
                          f"continue it with its own config or choose another hydra.run.dir")


def precision_for(setting: str) -> str:
    import torch

    if setting != "auto":
        return setting
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def make_loggers(cfg: dict, run_dir: Path, resuming: bool, rank_zero: bool = True) -> list:
    """The configured loggers. Every rank gets them (Lightning logs from rank 0 only); only rank
    0 touches files: the CSV part renaming and W&B's run id."""
    from lightning.pytorch.loggers import CSVLogger

    loggers = []
    names = cfg["logger"].get("names", [])
    if "csv" in names:
        csv_dir = run_dir / "logs" / "csv"
        metrics = csv_dir / "metrics.csv"
        if rank_zero and metrics.exists():  # Lightning's CSV writer would delete it: keep it as an earlier part
            part = len(list(csv_dir.glob("metrics-part*.csv")))
            metrics.rename(csv_dir / f"metrics-part{part:03d}.csv")
        loggers.append(CSVLogger(save_dir=str(run_dir), name="logs", version="csv"))
    if "wandb" in names:
        loggers.append(make_wandb_logger(cfg, run_dir, rank_zero))
    return loggers


def wandb_mode(setting: str) -> str:
    import os

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


def make_wandb_logger(cfg: dict, run_dir: Path, rank_zero: bool = True):
    import uuid

    from lightning.pytorch.loggers import WandbLogger

    # One W&B run per run dir: a resumed or requeued job continues the same W&B run. Other
    # ranks never start a W&B run (Lightning gives them a no-op experiment): no id needed.
    id_file = run_dir / "wandb_id.txt"
    if rank_zero and not id_file.exists():
        id_file.write_text(uuid.uuid4().hex[:12])
    run_id = id_file.read_text().strip() if rank_zero else None
    mode = wandb_mode(cfg["logger"].get("mode", "auto"))
    return WandbLogger(project=cfg["logger"].get("project", "treeffn"), name=run_dir.name, save_dir=str(run_dir),
                       id=run_id, resume="allow", mode=mode, config=cfg)


def train(cfg: dict, run_dir: Path, command: dict | None = None) -> dict:
    """Train one model as configured; writes the run dir and returns the result record.

    Every started run also appends its outcome to ``<run dir>/../index.jsonl`` (finished,
    preempted or failed with its error), so a sweep's index shows every job.
    """
    validate_train_config(cfg)  # bad settings fail here, before torch and Lightning are imported
    from treeffn.results.index import INDEX_FILE, append_record
    from treeffn.training.run_files import release_run_dir

    run_dir = Path(run_dir)
    index = run_dir.parent / INDEX_FILE
    try:
        result = _train(cfg, run_dir, command)
    except ConfigError:
        raise  # bad input: nothing ran, nothing is recorded (and Lightning need not be imported)
    except Preempted as e:
        from treeffn.training.distributed import is_global_zero

        if is_global_zero():  # one record per run, whatever the number of ranks
            append_record(index, {"run_dir": str(run_dir), "status": "preempted", "error": str(e)})
        raise
    except BaseException as e:
        from treeffn.training.distributed import is_global_zero

        if is_global_zero():
            error = f"{type(e).__name__}: {e}".strip()
            write_json_atomic(run_dir / "result.json", {"format": RESULT_FORMAT, "status": "failed", "error": error,
                                                        "run_dir": str(run_dir), "seed": cfg.get("seed")})
            append_record(index, {"run_dir": str(run_dir), "status": "failed", "error": error})
        raise
    finally:
        release_run_dir(run_dir)
    from treeffn.training.distributed import is_global_zero

    if not is_global_zero():
        return result  # the other ranks trained; rank 0 records and evaluates
    append_record(index, {k: result.get(k) for k in ("run_dir", "status", "val_loss", "val_ppl", "steps",
                                                     "tokens_seen", "ffn", "model", "seed")})
    if cfg.get("eval_after_train") and result["status"] == "finished":
        # Outside the try above: an evaluation problem never turns a finished run into a failed one.
        from treeffn.evaluation.runner import eval_config_for_run, evaluate
        from treeffn.results.record import read_result

        evaluate(eval_config_for_run(run_dir, cfg))  # writes eval.json and result.json["eval"]
        result = read_result(run_dir)
    return result


def _train(cfg: dict, run_dir: Path, command: dict | None) -> dict:
    validate_train_config(cfg)
    if cfg.get("eval_after_train"):
        from treeffn.evaluation.runner import check_eval_after_train

        check_eval_after_train(run_dir, cfg)  # bad task names / no lm-eval: fail now, not after training
    run_dir = Path(run_dir)
    check_written_by_older_treeffn(run_dir)
    ckpt = find_resume_checkpoint(cfg, run_dir)
    if ckpt is not None:
        check_same_experiment(cfg, run_dir)
    from treeffn.data.sources import check_inputs

    check_inputs(cfg["data"])  # missing, empty, binary or non-UTF-8 files: refused before the heavy imports

    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
    from omegaconf import OmegaConf

    from treeffn.data.datamodule import TextDataModule
    from treeffn.models.build import accounting, build_model
    from treeffn.training.callbacks import InitialCheckpoint, RoutingStats, Throughput
    from treeffn.training.lm_module import CausalLMModule
    from treeffn.training.distributed import (RankSeed, accumulation, check_resume_batch, is_fsdp, launched_ranks,
                                              make_strategy, rank_command)
    from treeffn.training.reliability import NonFiniteGuard, Preemption, RNGState, check_checkpoint_fits
    from treeffn.training.run_files import hold_run_dir

    started = time.perf_counter()
    L.seed_everything(cfg["seed"], workers=True, verbose=False)
    data = TextDataModule(cfg["data"], seed=cfg["seed"])
    data.setup()  # tokenizes and packs now, so bad data fails before a model is built
    model = build_model(cfg["model"], cfg["tree"], vocab_size=data.vocab_size, **data.special_ids())
    acct = accounting(model)
    if ckpt is not None:
        check_checkpoint_fits(ckpt, model)

    t = cfg["trainer"]
    module = CausalLMModule(model, cfg["optim"], max_steps=t["max_steps"])
    tree_cfg = cfg["tree"]
    # Every tree family keeps node_visits in the heap layout (leaf family: routers + leaves).
    with_stats = tree_cfg["ffn"] == "tree" and tree_cfg.get("track_stats", True)
    routing = RoutingStats(every_n_steps=tree_cfg.get("stats_every_n_steps", 50))
    callbacks = [
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="step{step:07d}", auto_insert_metric_name=False,
                        every_n_train_steps=cfg["checkpoint"]["every_n_steps"], save_last=True,
                        save_top_k=-1 if cfg["checkpoint"]["keep_all"] else 1, monitor=None,
                        enable_version_counter=False),
        throughput := Throughput(tokens_per_step=0),
        *([routing] if with_stats else []),
        *([InitialCheckpoint(run_dir / "checkpoints" / "step0000000.ckpt")] if cfg["checkpoint"]["keep_all"] else []),
        RNGState(),
        RankSeed(cfg["seed"]),  # after RNGState: several ranks draw from per-rank streams
        guard := NonFiniteGuard(cfg["guard"]["max_non_finite_steps"]),
        preemption := Preemption(run_dir / "checkpoints" / "last.ckpt"),
        RichProgressBar(leave=True),
    ]
    precision = precision_for(t["precision"])
    trainer = L.Trainer(
        default_root_dir=str(run_dir),
        accelerator=t["accelerator"],
        devices=t["devices"],
        num_nodes=t.get("num_nodes", 1),
        strategy=make_strategy(t, model, precision),
        precision=precision,
        max_steps=t["max_steps"],
        max_epochs=-1,
        val_check_interval=min(t["val_check_interval"], t["max_steps"]),  # in steps: scaled below
        check_val_every_n_epoch=None,
        # The DataModule applies trainer.limit_val_batches itself, the same on any device count.
        limit_val_batches=0 if t["limit_val_batches"] == 0 else 1.0,
        gradient_clip_val=cfg["optim"]["grad_clip"],
        log_every_n_steps=t["log_every_n_steps"],
        deterministic=t["deterministic"],
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the DataModule's samplers shard by rank themselves
        logger=False,  # set below, once this process knows whether it is rank 0
        callbacks=callbacks,
        enable_model_summary=False,
    )
    # The device count is known now (from the Trainer, which reads Slurm/torchrun settings too).
    trainer.accumulate_grad_batches = accumulation(cfg, trainer.world_size)
    # Lightning counts val_check_interval in micro-batches; the config counts optimizer steps.
    trainer.val_check_interval = min(t["val_check_interval"], t["max_steps"]) * trainer.accumulate_grad_batches
    global_blocks = data.global_batch_blocks(trainer.accumulate_grad_batches, trainer.world_size)
    if ckpt is not None:
        check_resume_batch(ckpt, global_blocks, data.block_size)
    data.val_limit = t["limit_val_batches"]
    ranks_command = rank_command(trainer)  # how Lightning will start the other ranks, if it does
    rank_zero = trainer.is_global_zero

    # Everything above can fail on bad input; nothing in the run dir is written before this
    # line, and only by rank 0 (the other ranks of a job read these files, never write them).
    if rank_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        hold_run_dir(run_dir)  # released by train() when this run ends, however it ends
        write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(cfg)))
        write_json_atomic(run_dir / "environment.json", environment_snapshot())
        if command is not None:
            write_json_atomic(run_dir / "command.json", command)
    trainer.loggers = make_loggers(cfg, run_dir, resuming=ckpt is not None, rank_zero=rank_zero)

    tokens_per_step = global_blocks * data.block_size
    throughput.tokens_per_step = tokens_per_step
    with launched_ranks(ranks_command):  # Lightning starts the other ranks (if it does); ended after
        trainer.fit(module, datamodule=data, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
        if preemption.received:
            result = {"format": RESULT_FORMAT, "status": "preempted", "signal": preemption.received,
                      "steps": int(trainer.global_step), "run_dir": str(run_dir)}
            if rank_zero:
                write_json_atomic(run_dir / "result.json", result)
            raise Preempted(f"received {preemption.received} at step {trainer.global_step}; checkpoint saved in "
                            f"{run_dir / 'checkpoints' / 'last.ckpt'}; rerun the same command to continue",
                            signal_name=preemption.received)

        # The result's validation numbers come from the final weights (all ranks take part).
        if module.last_validation is None or module.last_validation["step"] != trainer.global_step:
            trainer.validate(module, datamodule=data, verbose=False)
        # FSDP leaves each rank a shard of every weight: gather the full weights for the hf/
        # export below now, while the ranks are connected (all take part; rank 0 receives them).
        full_weights = trainer.strategy.lightning_module_state_dict() if is_fsdp(trainer) else None
    val = module.last_validation
    result = {
        "format": RESULT_FORMAT,
        "status": "finished",
        "val_loss": val["val_loss"],
        "val_ppl": val["val_ppl"],
        "unigram_val_ppl": data.stats.get("unigram_ppl"),
        "steps": int(trainer.global_step),
        "tokens_seen": int(trainer.global_step * tokens_per_step),
        # Unique training tokens (whole blocks) and passes over them: > 1 means repeated data.
        "train_tokens_unique": len(data.train_set) * data.block_size,
        "epochs": round(trainer.global_step * tokens_per_step / (len(data.train_set) * data.block_size), 6),
        "data_prepared": data.stats.get("prepared"),
        "wall_s": round(module.train_wall_s, 3),
        "invocation_wall_s": round(time.perf_counter() - started, 3),
        **{k: v for k, v in acct.as_dict().items()},
        "ffn": cfg["tree"]["ffn"],
        "tree": ({**cfg["tree"], "trees": resolve_trees(cfg["model"], cfg["tree"])}
                 if cfg["tree"]["ffn"] == "tree" else None),
        "model": cfg["model"]["name"],
        "seed": cfg["seed"],
        "routing": routing.last or None,
        "run_dir": str(run_dir),
    }
    if "hard_soft_gap" in val:  # leaf family: soft-mixture loss and the hard-minus-soft gap
        result["val_soft_loss"] = val["val_soft_loss"]
        result["hard_soft_gap"] = val["hard_soft_gap"]
    if trainer.is_global_zero:
        # A Hugging Face model dir: AutoModelForCausalLM.from_pretrained(<run>/hf) after `import treeffn`.
        from treeffn.models.hf import save_hf

        export = module.model
        if full_weights is not None:
            export = build_model(cfg["model"], cfg["tree"], vocab_size=data.vocab_size, **data.special_ids())
            export.load_state_dict({k[len("model."):]: v for k, v in full_weights.items() if k.startswith("model.")})
        save_hf(export, data.tokenizer, run_dir / "hf")
        result["hf_dir"] = str(run_dir / "hf")
    if guard.stop_reason:
        result["status"] = "stopped_non_finite"
        result["stop_reason"] = guard.stop_reason
    elif not math.isfinite(result["val_loss"]):
        result["status"] = "non_finite"
    result["skipped_non_finite_steps"] = guard.skipped
    if not rank_zero:
        return result
    write_json_atomic(run_dir / "result.json", result)
    for lg in trainer.loggers:
        if type(lg).__name__ == "WandbLogger":
            lg.experiment.summary.update({k: v for k, v in result.items() if isinstance(v, (int, float))})
            lg.experiment.finish()
    return result
