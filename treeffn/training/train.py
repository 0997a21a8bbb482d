"""``treeffn train``: one training run from a composed config to a finished run dir.

Run dir layout:
    config.yaml          resolved config of this run
    environment.json     git revision, package versions, hardware
    checkpoints/         last.ckpt plus periodic step checkpoints
    logs/csv/metrics*.csv, wandb/   logged metrics
    result.json          the machine-readable result record
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from treeffn.config import ConfigError, resolve_trees, validate_train_config
from treeffn.results.record import RESULT_FORMAT, environment_snapshot, write_json_atomic

# Keys whose change makes a different experiment: resuming across them is refused.
IDENTITY_KEYS = ("model", "tree", "data", "seed")


def find_resume_checkpoint(cfg: dict, run_dir: Path) -> Path | None:
    last = run_dir / "checkpoints" / "last.ckpt"
    resume = cfg["resume"]
    if resume == "never":
        if last.exists():
            raise ConfigError(f"run dir {run_dir} already holds checkpoints; pass resume=auto to continue it "
                              f"or choose another hydra.run.dir")
        return None
    if resume == "auto":
        return last if last.exists() else None
    path = Path(resume).expanduser()
    if not path.is_file():
        raise ConfigError(f"resume={resume}: no such checkpoint file")
    return path


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


def make_loggers(cfg: dict, run_dir: Path, resuming: bool) -> list:
    from lightning.pytorch.loggers import CSVLogger

    loggers = []
    names = cfg["logger"].get("names", [])
    if "csv" in names:
        csv_dir = run_dir / "logs" / "csv"
        metrics = csv_dir / "metrics.csv"
        if metrics.exists():  # Lightning's CSV writer would delete it: keep it as an earlier part
            part = len(list(csv_dir.glob("metrics-part*.csv")))
            metrics.rename(csv_dir / f"metrics-part{part:03d}.csv")
        loggers.append(CSVLogger(save_dir=str(run_dir), name="logs", version="csv"))
    if "wandb" in names:
        loggers.append(make_wandb_logger(cfg, run_dir))
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


def make_wandb_logger(cfg: dict, run_dir: Path):
    import uuid

    from lightning.pytorch.loggers import WandbLogger

    # One W&B run per run dir: a resumed or requeued job continues the same W&B run.
    id_file = run_dir / "wandb_id.txt"
    if not id_file.exists():
        id_file.write_text(uuid.uuid4().hex[:12])
    mode = wandb_mode(cfg["logger"].get("mode", "auto"))
    return WandbLogger(project=cfg["logger"].get("project", "treeffn"), name=run_dir.name, save_dir=str(run_dir),
                       id=id_file.read_text().strip(), resume="allow", mode=mode, config=cfg)


def train(cfg: dict, run_dir: Path) -> dict:
    """Train one model as configured; writes the run dir and returns the result record."""
    validate_train_config(cfg)
    run_dir = Path(run_dir)
    ckpt = find_resume_checkpoint(cfg, run_dir)
    if ckpt is not None:
        check_same_experiment(cfg, run_dir)

    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
    from omegaconf import OmegaConf

    from treeffn.data.datamodule import TextDataModule
    from treeffn.models.build import accounting, build_model
    from treeffn.training.callbacks import RoutingSummary, Throughput
    from treeffn.training.lm_module import CausalLMModule

    started = time.perf_counter()
    L.seed_everything(cfg["seed"], workers=True, verbose=False)
    data = TextDataModule(cfg["data"], seed=cfg["seed"])
    data.setup()  # tokenizes and packs now, so bad data fails before a model is built
    model = build_model(cfg["model"], cfg["tree"], vocab_size=data.vocab_size, **data.special_ids())
    acct = accounting(model)

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    write_json_atomic(run_dir / "environment.json", environment_snapshot())

    t = cfg["trainer"]
    module = CausalLMModule(model, cfg["optim"], max_steps=t["max_steps"])
    routing = RoutingSummary()
    callbacks = [
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="step{step:07d}", auto_insert_metric_name=False,
                        every_n_train_steps=cfg["checkpoint"]["every_n_steps"], save_last=True,
                        save_top_k=-1 if cfg["checkpoint"]["keep_all"] else 1, monitor=None,
                        enable_version_counter=False),
        throughput := Throughput(tokens_per_step=0),
        routing,
        RichProgressBar(leave=True),
    ]
    trainer = L.Trainer(
        default_root_dir=str(run_dir),
        accelerator=t["accelerator"],
        devices=t["devices"],
        precision=precision_for(t["precision"]),
        max_steps=t["max_steps"],
        max_epochs=-1,
        val_check_interval=min(t["val_check_interval"], t["max_steps"]),
        check_val_every_n_epoch=None,
        limit_val_batches=t["limit_val_batches"],
        accumulate_grad_batches=t["accumulate_grad_batches"],
        gradient_clip_val=cfg["optim"]["grad_clip"],
        log_every_n_steps=t["log_every_n_steps"],
        deterministic=t["deterministic"],
        num_sanity_val_steps=0,
        logger=make_loggers(cfg, run_dir, resuming=ckpt is not None) or False,
        callbacks=callbacks,
        enable_model_summary=False,
    )
    tokens_per_step = data.batch_size * data.block_size * t["accumulate_grad_batches"] * trainer.world_size
    throughput.tokens_per_step = tokens_per_step
    trainer.fit(module, datamodule=data, ckpt_path=str(ckpt) if ckpt else None)

    # The result's validation numbers come from the final weights.
    if module.last_validation is None or module.last_validation["step"] != trainer.global_step:
        trainer.validate(module, datamodule=data, verbose=False)
    val = module.last_validation
    result = {
        "format": RESULT_FORMAT,
        "status": "finished",
        "val_loss": val["val_loss"],
        "val_ppl": val["val_ppl"],
        "unigram_val_ppl": data.stats.get("unigram_ppl"),
        "steps": int(trainer.global_step),
        "tokens_seen": int(trainer.global_step * tokens_per_step),
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
    if not math.isfinite(result["val_loss"]):
        result["status"] = "non_finite"
    write_json_atomic(run_dir / "result.json", result)
    for lg in trainer.loggers:
        if type(lg).__name__ == "WandbLogger":
            lg.experiment.summary.update({k: v for k, v in result.items() if isinstance(v, (int, float))})
            lg.experiment.finish()
    return result
