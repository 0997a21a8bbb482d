"""Short real training runs on CPU: loss falls, the run dir is complete, resume=auto continues."""

import json

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from tests.conftest import TINY
from treeffn.config import ConfigError
from treeffn.training.train import train

pytestmark = pytest.mark.slow


def make_cfg(cache_dir, *overrides):
    with initialize_config_module("treeffn.conf", version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, f"data.cache_dir={cache_dir}", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def read_metrics(run_dir):
    import csv

    rows = []
    for path in sorted((run_dir / "logs" / "csv").glob("metrics*.csv")):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return rows


def test_tree_model_loss_falls_and_run_dir_is_complete(tmp_path, cache_dir):
    cfg = make_cfg(cache_dir, "tree.depth=2", "trainer.max_steps=40", "optim.lr=3e-3", "optim.warmup_steps=5")
    result = train(cfg, tmp_path / "run")
    run = tmp_path / "run"
    for name in ("config.yaml", "environment.json", "result.json", "checkpoints/last.ckpt"):
        assert (run / name).exists(), name
    saved = json.loads((run / "result.json").read_text())
    assert saved == json.loads(json.dumps(result))
    for key in ("val_loss", "val_ppl", "tokens_seen", "steps", "wall_s", "params_total", "params_ffn",
                "active_ffn_fraction", "ffn", "tree", "seed"):
        assert key in saved, key
    assert saved["steps"] == 40 and saved["tokens_seen"] == 40 * 8 * 32
    assert saved["ffn"] == "tree" and saved["tree"]["depth"] == 2
    losses = [float(r["train/loss"]) for r in read_metrics(run) if r.get("train/loss")]
    assert len(losses) >= 4
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.5, losses
    val = [float(r["val/loss"]) for r in read_metrics(run) if r.get("val/loss")]
    assert len(val) == 4 and val[-1] < val[0] - 0.5, val
    assert saved["val_loss"] == pytest.approx(val[-1])
    assert 0.0 <= saved["routing"]["mean"]["dead_frac"] <= 1.0
    env = json.loads((run / "environment.json").read_text())
    assert env["versions"]["torch"] and "hardware" in env


def test_resume_auto_continues_from_the_last_checkpoint(tmp_path, cache_dir):
    run = tmp_path / "run"
    first = train(make_cfg(cache_dir, "tree=dense", "trainer.max_steps=10"), run)
    assert first["steps"] == 10 and first["ffn"] == "dense"
    second = train(make_cfg(cache_dir, "tree=dense", "trainer.max_steps=20", "resume=auto"), run)
    assert second["steps"] == 20 and second["tokens_seen"] == 20 * 8 * 32
    steps = [int(r["step"]) for r in read_metrics(run) if r.get("train/loss")]
    assert steps == sorted(steps) and min(steps) < 10 < max(steps)  # both parts of the run, in order
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(make_cfg(cache_dir, "tree=dense", "trainer.max_steps=20", "resume=never"), run)
    with pytest.raises(ConfigError, match="different tree"):
        train(make_cfg(cache_dir, "tree.depth=2", "trainer.max_steps=30"), run)


def test_tree_lr_scale_gives_the_tree_layers_their_own_learning_rate(cache_dir):
    from treeffn.models.build import build_model
    from treeffn.models.swap import tree_layers
    from treeffn.training.lm_module import CausalLMModule

    cfg = make_cfg(cache_dir, "tree.depth=2", "optim.tree_lr_scale=3")
    model = build_model(cfg["model"], cfg["tree"], vocab_size=64, pad_id=0, bos_id=0, eos_id=0)
    opt = CausalLMModule(model, cfg["optim"], max_steps=10).configure_optimizers()["optimizer"]
    tree_ids = {id(p) for layer in tree_layers(model) for p in layer.parameters()}
    lr = cfg["optim"]["lr"]
    for group in opt.param_groups:
        ids = {id(p) for p in group["params"]}
        assert ids <= tree_ids or not ids & tree_ids  # a group is all tree or no tree
        expected = 3 * lr if ids and ids <= tree_ids else lr
        assert group["initial_lr"] == pytest.approx(expected)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    # the default: the two groups of before (decay, no decay), one learning rate
    plain = CausalLMModule(model, make_cfg(cache_dir, "tree.depth=2")["optim"], max_steps=10)
    assert len(plain.configure_optimizers()["optimizer"].param_groups) == 2


# ------------------------------------------------------------------------------ the progress bar
@pytest.mark.parametrize("accumulate, resume_at", [(1, 0), (2, 0), (1, 4)])
def test_the_progress_bar_counts_optimizer_steps_to_max_steps_over_epochs(tmp_path, accumulate, resume_at):
    """One bar, "training steps", total trainer.max_steps, advanced by optimizer steps: 3 batches
    an epoch, so 7 steps span several epochs (Lightning's own bar restarted at each and read
    "Epoch 0/-2"); with gradient accumulation it still ends at 7 of 7; a resumed run starts at its step."""
    import lightning as L
    import torch

    from treeffn.training.progress import StepProgressBar

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(2, 1)

        def training_step(self, batch, _):
            return self.w(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(3, 2)), batch_size=1)
    ckpt = None
    if resume_at:
        first = L.Trainer(max_steps=resume_at, max_epochs=-1, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
        first.fit(Tiny(), data)
        first.save_checkpoint(ckpt := tmp_path / "resume.ckpt")
    bar = StepProgressBar(leave=True)
    trainer = L.Trainer(max_steps=7, max_epochs=-1, accumulate_grad_batches=accumulate, logger=False,
                        enable_checkpointing=False, callbacks=[bar], enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    seen = []
    original = bar._update

    def record(task_id, current, **kwargs):
        if task_id == bar.train_progress_bar_id:
            seen.append(current)
        original(task_id, current, **kwargs)

    bar._update = record
    trainer.fit(Tiny(), data, ckpt_path=ckpt)
    tasks = [t for t in bar.progress.tasks if "training steps" in t.description]
    assert len(tasks) == 1, [t.description for t in bar.progress.tasks]
    assert tasks[0].total == 7 and tasks[0].completed == 7
    assert trainer.current_epoch >= 2 * accumulate  # several passes over the 3 batches, one bar
    assert seen[0] == resume_at + (1 if accumulate == 1 else 0) and seen[-1] == 7 and seen == sorted(seen)


def test_simple_profiler_writes_host_times_per_hook_into_the_run_dir(tmp_path, cache_dir):
    """trainer.profiler=simple: Lightning's SimpleProfiler, its table in <run dir>/profile/."""
    cfg = make_cfg(cache_dir, "tree.depth=2", "trainer.max_steps=12", "trainer.val_check_interval=12",
                   "trainer.profiler=simple", "logger=csv")
    assert train(cfg, tmp_path / "run")["status"] == "finished"
    table = (tmp_path / "run" / "profile" / "fit-host.txt").read_text()
    for action in ("run_training_batch", "[Callback]RoutingStats.on_train_batch_end", "optimizer_step"):
        assert action in table, action
    rows = {cells[1]: cells[2:] for cells in ([c.strip() for c in line.split("|")] for line in table.splitlines())
            if len(cells) > 4}
    assert rows["run_training_batch"][1] == "12" and float(rows["run_training_batch"][0]) > 0  # a call a step


def test_the_heap_is_frozen_while_training_and_thawed_after_it_or_a_crash(tmp_path, cache_dir):
    """FrozenHeap: objects alive at the start of training leave the collector's scans (gc.freeze)
    during training, and are handed back when training ends, normally or by an exception, so
    a sweep running several jobs in one process can free the earlier jobs' models."""
    import gc

    import lightning as L

    from treeffn.training import callbacks

    seen = {}

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.setdefault("frozen", gc.get_freeze_count())
            if batch_idx == 3 and seen.get("crash"):
                raise RuntimeError("crash in step 4")

    real = callbacks.FrozenHeap.on_train_start

    def with_probe(self, trainer, pl_module):
        trainer.callbacks.append(Probe())
        return real(self, trainer, pl_module)

    callbacks.FrozenHeap.on_train_start = with_probe
    try:
        cfg = make_cfg(cache_dir, "tree.depth=2", "trainer.max_steps=6", "trainer.val_check_interval=6", "logger=csv")
        assert train(cfg, tmp_path / "run")["status"] == "finished"
        assert seen["frozen"] > 100_000  # the libraries, the model and the optimizer
        assert gc.get_freeze_count() == 0
        seen.clear()
        seen["crash"] = True
        with pytest.raises(RuntimeError, match="crash in step 4"):
            train(make_cfg(cache_dir, "tree.depth=2", "trainer.max_steps=6", "trainer.val_check_interval=6",
                           "logger=csv"), tmp_path / "crashed")
        assert seen["frozen"] > 100_000 and gc.get_freeze_count() == 0
    finally:
        callbacks.FrozenHeap.on_train_start = real
