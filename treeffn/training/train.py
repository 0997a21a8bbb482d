"""``treeffn train``: one training run from a composed config to a finished run dir.

Run dir layout:
    .treeffn-run         the marker: treeffn's folder (run_files.py has the ownership rules)
    config.yaml          resolved config of this run
    command.json         the command line and its Hydra overrides
    environment.json     git revision, package versions, hardware
    checkpoints/         last.ckpt plus periodic step checkpoints (written atomically)
    logs/csv/metrics*.csv, wandb/   logged metrics
    result.json          the machine-readable result record (the last good one)
    failure.json         the newest attempt's error, while it is the newest attempt
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from treeffn.config import ConfigError, resolve_trees, validate_train_config, validates_at_start
from treeffn.atomic import atomic_folder, storage_error, write_json_atomic, write_text_atomic
from treeffn.results.record import FAILURE_FILE, RESULT_FORMAT, environment_snapshot, wandb_mode
from treeffn.training.run_files import (check_run_dir_is_ours, check_same_experiment,
                                       check_written_by_older_treeffn, finished_result, unusable_file)

class Preempted(RuntimeError):
    """The run stopped on a signal after saving a checkpoint; the same command continues it.

    ``status`` is ``interrupted`` for Ctrl-C (SIGINT), ``preempted`` for the signals a scheduler
    sends (SIGTERM, SIGUSR1, SIGUSR2)."""

    def __init__(self, message: str, signal_name: str | None = None):
        super().__init__(message)
        self.signal_name = signal_name
        self.status = "interrupted" if signal_name == "SIGINT" else "preempted"


class StorageError(ConfigError):
    """The run dir's storage refused a write (disk full, read-only, no permission). The message
    names the file, the reason and the checkpoint a rerun continues from."""


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
    problem = unusable_file(path)
    if problem:
        raise ConfigError(f"resume={resume}: {problem}; give the path of a .ckpt file")
    return path


def precision_for(setting: str) -> str:
    import torch

    if setting != "auto":
        return setting
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def make_loggers(cfg: dict, run_dir: Path, resume_step: int, rank_zero: bool = True) -> list:
    """The configured loggers. Every rank gets them (Lightning logs from rank 0 only); only rank
    0 touches files: the CSV parts (``resume_step``: the step training continues from) and W&B's
    run id."""
    from lightning.pytorch.loggers import CSVLogger

    from treeffn.training.run_files import start_metrics_part

    loggers = []
    names = cfg["logger"].get("names", [])
    if "csv" in names:
        csv_dir = run_dir / "logs" / "csv"
        if rank_zero and csv_dir.is_dir():
            start_metrics_part(csv_dir, resume_step)
        loggers.append(CSVLogger(save_dir=str(run_dir), name="logs", version="csv"))
    if "wandb" in names:
        loggers.append(make_wandb_logger(cfg, run_dir, rank_zero))
    return loggers


def make_wandb_logger(cfg: dict, run_dir: Path, rank_zero: bool = True):
    import uuid

    from lightning.pytorch.loggers import WandbLogger

    # One W&B run per run dir: a resumed or requeued job continues the same W&B run. Other
    # ranks never start a W&B run (Lightning gives them a no-op experiment): no id needed.
    id_file = run_dir / "wandb_id.txt"
    if rank_zero and not id_file.exists():
        write_text_atomic(id_file, uuid.uuid4().hex[:12])
    run_id = id_file.read_text().strip() if rank_zero else None
    mode = wandb_mode(cfg["logger"].get("mode", "auto"))
    logger = WandbLogger(project=cfg["logger"].get("project", "treeffn"), name=run_dir.name, save_dir=str(run_dir),
                         id=run_id, resume="allow", mode=mode, config=cfg)
    # Lightning hands wandb.init anonymous=None whatever it is given, and wandb (>= 0.19) answers
    # every run with "The anonymous setting has no effect": leave the setting out.
    logger._wandb_init.pop("anonymous", None)
    return logger


def ignore_warnings_nobody_can_act_on() -> None:
    """Lightning's own use of a torch API that torch deprecated (``isinstance(treespec,
    LeafSpec)``, a FutureWarning at every fit): only a Lightning release can change it."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)


def train(cfg: dict, run_dir: Path, command: dict | None = None) -> dict:
    """Train one model as configured; writes the run dir and returns the result record.

    Every started run also appends its outcome to ``<run dir>/../index.jsonl`` (finished,
    preempted, interrupted or failed with its error), so a sweep's index shows every job. A run
    dir that already holds this command's finished run is left as it is: the record returned
    then has ``already_finished: True``.
    """
    validate_train_config(cfg)  # bad settings fail here, before torch and Lightning are imported
    ignore_warnings_nobody_can_act_on()
    from treeffn.results.index import INDEX_FILE, append_record
    from treeffn.training.run_files import release_run_dir

    run_dir = Path(run_dir)
    index = run_dir.parent / INDEX_FILE
    try:
        result = _train(cfg, run_dir, command)
    except ConfigError:
        raise  # bad input: nothing ran, nothing is recorded (and Lightning need not be imported)
    except (Preempted, KeyboardInterrupt) as e:
        stop = e
        if isinstance(e, KeyboardInterrupt):  # Ctrl-C outside the training loop (loading, the final export)
            stop = Preempted("Ctrl-C outside the training steps (while loading or exporting); the newest checkpoint "
                             f"in {run_dir / 'checkpoints'} (if any) is kept; rerun the same command to continue",
                             signal_name="SIGINT")
        if _is_global_zero():  # one record per run, whatever the number of ranks
            _record_quietly(lambda: append_record(index, {"run_dir": str(run_dir), "status": stop.status,
                                                          "error": str(stop)}))
        raise stop from None
    except BaseException as e:
        full = storage_error(e)
        error = _storage_message(full, run_dir) if full is not None else f"{type(e).__name__}: {e}".strip()
        if _is_global_zero():
            # result.json keeps the last good record (a finished or preempted run); the failure goes
            # beside it, and to the index. On a full disk these writes may fail too: never mask e.
            _record_quietly(lambda: write_json_atomic(run_dir / FAILURE_FILE, {
                "format": RESULT_FORMAT, "status": "failed", "error": error, "time": time.time(),
                "run_dir": str(run_dir), "seed": cfg.get("seed")}), quiet=full is not None)
            _record_quietly(lambda: append_record(index, {"run_dir": str(run_dir), "status": "failed",
                                                          "error": error}), quiet=full is not None)
        if full is not None:
            raise StorageError(error) from e
        raise
    finally:
        release_run_dir(run_dir)
    if result.get("already_finished") or not _is_global_zero():
        return result  # nothing was done / the other ranks trained; rank 0 records and evaluates
    append_record(index, {k: result.get(k) for k in ("run_dir", "status", "val_loss", "val_ppl", "steps",
                                                     "tokens_seen", "ffn", "model", "seed")})
    if cfg.get("eval_after_train") and result["status"] == "finished":
        # Outside the try above: an evaluation problem never turns a finished run into a failed one.
        from treeffn.evaluation.runner import eval_config_for_run, evaluate
        from treeffn.results.record import read_result

        evaluate(eval_config_for_run(run_dir, cfg))  # writes eval.json and result.json["eval"]
        result = read_result(run_dir)
    return result


def write_result(run_dir: Path, result: dict) -> None:
    """A good record (finished, preempted, interrupted, stopped): result.json, and the failure
    record of an earlier attempt is gone (the index keeps the history)."""
    write_json_atomic(run_dir / "result.json", result)
    (run_dir / FAILURE_FILE).unlink(missing_ok=True)


def _is_global_zero() -> bool:
    from treeffn.training.distributed import is_global_zero

    return is_global_zero()


def _record_quietly(write, quiet: bool = False) -> None:
    """Write a record of a stop or failure; when the disk refuses that too, say so on stderr
    (``quiet``: not when the error being recorded already says the disk refuses writes)."""
    import sys

    try:
        write()
    except OSError as e:
        if not quiet:
            print(f"treeffn train: warning: could not record the outcome ({e})", file=sys.stderr)


def _storage_message(error: OSError, run_dir: Path) -> str:
    """One line: the file, the reason, and the checkpoint the same command will continue from."""
    import warnings

    from treeffn.training.run_files import pick_resume_checkpoint

    where = error.filename or run_dir
    try:
        with warnings.catch_warnings():  # which checkpoint is unreadable is for the rerun to say
            warnings.simplefilter("ignore")
            ckpt = pick_resume_checkpoint(run_dir / "checkpoints")
    except (ConfigError, OSError):
        ckpt = None
    kept = (f"the newest good checkpoint, {ckpt}, is intact: free space (or fix the folder) and rerun the same "
            f"command to continue" if ckpt else "no checkpoint was saved yet: free space (or fix the folder) and rerun")
    return f"cannot write {where}: {error.strerror or error}; {kept}"


def _train(cfg: dict, run_dir: Path, command: dict | None) -> dict:
    validate_train_config(cfg)
    if cfg.get("eval_after_train"):
        from treeffn.evaluation.runner import check_eval_after_train

        check_eval_after_train(run_dir, cfg)  # bad task names / no lm-eval: fail now, not after training
    run_dir = Path(run_dir)
    check_written_by_older_treeffn(run_dir)
    check_run_dir_is_ours(run_dir)  # someone else's files are never overwritten
    check_same_experiment(cfg, run_dir)  # nor another command's run
    if cfg["resume"] == "auto" and (done := finished_result(run_dir, cfg)) is not None:
        return {**done, "already_finished": True}  # nothing to train, nothing rewritten
    ckpt = find_resume_checkpoint(cfg, run_dir)
    from treeffn.data.sources import check_inputs

    check_inputs(cfg["data"])  # missing, empty, binary or non-UTF-8 files: refused before the heavy imports
    from treeffn.training.resources import check_machine_fits

    check_machine_fits(cfg, precision_for(cfg["trainer"]["precision"]))  # processes, memory: before building

    import lightning as L
    from omegaconf import OmegaConf

    from treeffn.data.datamodule import TextDataModule
    from treeffn.models.build import accounting, build_model
    from treeffn.training.callbacks import FrozenHeap, InitialCheckpoint, RoutingStats, Throughput
    from treeffn.training.lm_module import CausalLMModule
    from treeffn.training.progress import StepProgressBar
    from treeffn.training.distributed import (RankSeed, accumulation, check_resume_batch, is_fsdp, launched_ranks,
                                              make_strategy, rank_command)
    from treeffn.training.reliability import (AtomicCheckpointIO, NonFiniteGuard, PeriodicCheckpoint, Preemption,
                                              RNGState, check_checkpoint_fits)
    from treeffn.training.run_files import INITIAL_CHECKPOINT, checkpoint_step, claim_run_dir

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
    if t.get("compile"):
        from treeffn.training.compiling import compile_decoder_layers

        compile_decoder_layers(model)  # in place, after the module read the parameter names
    tree_cfg = cfg["tree"]
    # Every tree family keeps node_visits in the heap layout (leaf family: routers + leaves).
    with_stats = tree_cfg["ffn"] == "tree" and tree_cfg.get("track_stats", True)
    routing = RoutingStats(every_n_steps=tree_cfg.get("stats_every_n_steps", 10))
    callbacks = [
        PeriodicCheckpoint(run_dir / "checkpoints" / "last.ckpt", dirpath=run_dir / "checkpoints",
                           filename="step{step:07d}", auto_insert_metric_name=False,
                           every_n_train_steps=cfg["checkpoint"]["every_n_steps"],
                           save_top_k=-1 if cfg["checkpoint"]["keep_all"] else 1, monitor=None,
                           enable_version_counter=False),
        FrozenHeap(),
        throughput := Throughput(tokens_per_step=0),
        *([routing] if with_stats else []),
        *([InitialCheckpoint(run_dir / "checkpoints" / INITIAL_CHECKPOINT)] if with_stats else []),
        RNGState(),
        RankSeed(cfg["seed"]),  # after RNGState: several ranks draw from per-rank streams
        guard := NonFiniteGuard(cfg["guard"]["max_non_finite_steps"]),
        preemption := Preemption(run_dir / "checkpoints" / "last.ckpt"),
        StepProgressBar(leave=True),  # steps to trainer.max_steps, with the time left
    ]
    precision = precision_for(t["precision"])
    profiler = None
    if t.get("profiler") == "simple":
        from lightning.pytorch.profilers import SimpleProfiler

        profiler = SimpleProfiler(dirpath=run_dir / "profile", filename="host")  # fit-host[-<rank>].txt
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
        # no_grad, not inference_mode, for trainer.validate: tensors made in inference mode (the
        # metrics' states after a validation before the first step) cannot be updated in training.
        inference_mode=False,
        use_distributed_sampler=False,  # the DataModule's samplers shard by rank themselves
        logger=False,  # set below, once this process knows whether it is rank 0
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],  # temp file in checkpoints/, fsync, rename: never half a checkpoint
        enable_model_summary=False,
        profiler=profiler,
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
        claim_run_dir(run_dir)  # marker and lock; the lock is released by train() however the run ends
        write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(cfg)))
        write_json_atomic(run_dir / "environment.json", environment_snapshot())
        if command is not None:
            write_json_atomic(run_dir / "command.json", command)
    trainer.loggers = make_loggers(cfg, run_dir, resume_step=checkpoint_step(ckpt) if ckpt else 0,
                                   rank_zero=rank_zero)

    tokens_per_step = global_blocks * data.block_size
    throughput.tokens_per_step = tokens_per_step
    with launched_ranks(ranks_command):  # Lightning starts the other ranks (if it does); ended after
        if ckpt is None and validates_at_start(cfg):  # a resumed run has it in its checkpoint
            trainer.validate(module, datamodule=data, verbose=False)
            module.val_at_start = dict(module.last_validation)
        trainer.fit(module, datamodule=data, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
        if preemption.received:
            stop = Preempted(f"received {preemption.received} at step {trainer.global_step}; checkpoint saved in "
                             f"{run_dir / 'checkpoints' / 'last.ckpt'}; rerun the same command to continue",
                             signal_name=preemption.received)
            if rank_zero:
                write_result(run_dir, {"format": RESULT_FORMAT, "status": stop.status, "signal": preemption.received,
                                       "steps": int(trainer.global_step), "run_dir": str(run_dir)})
            raise stop

        # The result's validation numbers come from the final weights (all ranks take part).
        if module.last_validation is None or module.last_validation["step"] != trainer.global_step:
            trainer.validate(module, datamodule=data, verbose=False)
        # last.ckpt holds the final weights (a link to the periodic checkpoint when the run ended on
        # a multiple of checkpoint.every_n_steps): treeffn analyze and a rerun start from the end.
        last = run_dir / "checkpoints" / "last.ckpt"
        if trainer.strategy.broadcast(not last.exists() or checkpoint_step(last) != trainer.global_step):
            trainer.save_checkpoint(str(last))
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
        # trainer.val_at_start: the same validation before the first step (None when not asked)
        "val_at_start": module.val_at_start,
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
        "routing": {**routing.last, "train_window": routing.last_window} if routing.last else None,
        "precision": precision,
        "peak_memory_gib_per_rank": throughput.peak_memory_gib_per_rank,
        "compile": bool(t.get("compile")),
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
        with atomic_folder(run_dir / "hf") as staging:  # a failed export leaves the previous hf/ whole
            save_hf(export, data.tokenizer, staging)
        result["hf_dir"] = str(run_dir / "hf")
    if guard.stop_reason:
        result["status"] = "stopped_non_finite"
        result["stop_reason"] = guard.stop_reason
    elif not math.isfinite(result["val_loss"]):
        result["status"] = "non_finite"
    result["skipped_non_finite_steps"] = guard.skipped
    if not rank_zero:
        return result
    write_result(run_dir, result)
    for lg in trainer.loggers:
        if type(lg).__name__ == "WandbLogger":
            lg.experiment.summary.update({k: v for k, v in result.items() if isinstance(v, (int, float))})
            lg.experiment.finish()
    return result
