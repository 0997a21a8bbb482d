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
