"""Routing statistics are exact on a hand-built tree; `treeffn analyze` on real runs."""

import json
import math

import pytest
import torch

from tests.conftest import run_cli
from treeffn import TreeFFN
from treeffn.analysis.routing import (layer_summary, level_logit_means, normalized_leaf_entropy, right_fraction, trend,
                                      verdict)

TOKENS = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [2.0, -3.0], [3.0, -1.0]], dtype=torch.float64)


def hand_built_tree():
    """Depth 2: the root splits on x0, its left child on x1, its right child on -x1; leaves score 0."""
    layer = TreeFFN(2, depth=2, trees=1).double()
    with torch.no_grad():
        layer.w_in.zero_()
        layer.b_in.zero_()
        layer.w_in[0] = torch.tensor([1.0, 0.0])
        layer.w_in[1] = torch.tensor([0.0, 1.0])
        layer.w_in[2] = torch.tensor([0.0, -1.0])
    return layer.eval()


@pytest.mark.parametrize("mode", ["eval", "train"])  # the gather path and the masked training path
def test_visits_entropy_dead_nodes_and_logits_are_exact(mode):
    layer = hand_built_tree().train(mode == "train")
    layer.node_visits.zero_()
    layer.level_logits.zero_()
    layer(TOKENS)
    # Routes: (1,1) 0→2→5; (-1,1) 0→1→4; (-1,-1) 0→1→3; (2,-3) 0→2→6; (3,-1) 0→2→6.
    assert layer.node_visits.tolist() == [5, 2, 3, 1, 1, 1, 2]
    expected_entropy = -(3 * 0.2 * math.log(0.2) + 0.4 * math.log(0.4)) / math.log(4)
    assert normalized_leaf_entropy(layer.node_visits, 1, 2).item() == pytest.approx(expected_entropy, abs=1e-12)
    assert right_fraction(layer.node_visits, 1, 2)[0].tolist() == pytest.approx([3 / 5, 1 / 2, 2 / 3])
    summary = layer_summary(layer.node_visits, 1, 2)
    assert summary["dead_frac"] == 0 and summary["leaves_used"] == 4
    # Right shares per level, token-weighted: the root sends 3 of 5 right; level 1 sends 1 of 2
    # (node 1) + 2 of 3 (node 2) = 3 of 5.
    assert summary["right_share_per_level"] == pytest.approx([3 / 5, 3 / 5])
    assert summary["root_right_share"] == pytest.approx(3 / 5)
    # level 0 sees x0; level 1 sees x1 (left child) or -x1 (right child); leaves have zero weights.
    assert level_logit_means(layer.level_logits) == pytest.approx([0.8, 0.6, 0.0])


def test_verdicts_relative_to_the_initialisation():
    assert trend(0.71, 0.80) == "spreading" and trend(0.71, 0.60) == "concentrating"
    assert trend(0.71, 0.72) == "unchanged" and trend(0.71, 0.2) == "collapsed"
    assert trend(float("nan"), 0.5) == "unvisited"


def test_dead_nodes_and_a_single_static_path():
    layer = hand_built_tree()
    layer.node_visits.zero_()
    layer(TOKENS[3:])  # both tokens take 0→2→6
    s = layer_summary(layer.node_visits, 1, 2)
    assert s["dead_frac"] == pytest.approx(4 / 7)  # nodes 1, 3, 4, 5 never reached
    assert s["leaf_entropy"] == 0.0 and s["leaves_used"] == 1
    assert verdict(s["leaf_entropy"]) == "collapsed" and verdict(0.9) == "balanced" and verdict(0.5) == "collapsing"


@pytest.mark.slow
def test_analyze_a_tree_run_and_refuse_a_dense_one(tmp_path, cache_dir):
    from tests.test_training import make_cfg
    from treeffn.training.train import train

    tree_run, dense_run = tmp_path / "tree", tmp_path / "dense"
    train(make_cfg(cache_dir, "tree.depth=3", "trainer.max_steps=20", "checkpoint.keep_all=true",
                   "tree.stats_every_n_steps=5"), tree_run)
    out = run_cli(["analyze", f"run={tree_run}", "max_blocks=8"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "layer 0:" in out.stdout and "of 256 tokens" in out.stdout and "at step 0" in out.stdout
    analysis = json.loads((tree_run / "analysis" / "analysis.json").read_text())
    assert [c["step"] for c in analysis["checkpoints"]] == [0, 5, 10, 15, 20]  # step 0: the initial weights
    assert analysis["tokens"] == 8 * 32 and analysis["initial_step"] == 0
    assert all(layer["trend"] in ("spreading", "concentrating", "unchanged", "collapsed")
               for layer in analysis["final"])
    for name in ("entropy_dead_nodes.png", "path_usage_layer0.png", "routing_logit_drift.png",
                 "routing_over_training.png"):
        assert (tree_run / "analysis" / name).stat().st_size > 1000
    import csv

    rows = list(csv.DictReader(open(tree_run / "logs" / "csv" / "metrics.csv")))
    # Every training window (every 5 steps) is in the log, whatever log_every_n_steps is.
    window_steps = [int(r["step"]) for r in rows if r.get("tree/mean/static_sparsity")]
    assert window_steps == [5, 10, 15, 20]
    for key in ("tree/layer0/static_sparsity", "tree/layer0/train_right_level0", "tree/layer0/train_logit_level3",
                "tree/layer0/logit_level0", "tree/layer0/right_level2", "tree/mean/root_right_share"):
        assert any(r.get(key) for r in rows), key

    train(make_cfg(cache_dir, "tree=dense", "trainer.max_steps=5"), dense_run)
    out = run_cli(["analyze", f"run={dense_run}"], cwd=tmp_path)
    assert out.returncode == 0 and "nothing to analyse" in out.stdout and "dense model" in out.stdout


@pytest.mark.slow
def test_analyze_on_the_whole_split_reproduces_the_training_validation(tmp_path, cache_dir):
    """Without keep_all a tree run still keeps its initial weights; analysing the final weights on
    the whole validation split gives the statistics the run's last validation recorded."""
    from tests.test_training import make_cfg
    from treeffn.analysis.analyze import analyse_run, held_out_blocks
    from treeffn.models.load import read_run_config
    from treeffn.training.train import train

    run = tmp_path / "run"
    # 11 steps: neither a checkpoint step (every 4) nor a validation step (every 4): the run still
    # ends with its final weights in last.ckpt
    result = train(make_cfg(cache_dir, "tree.depth=3", "trainer.max_steps=11", "tree.placement=post_sum",
                            "trainer.limit_val_batches=1.0", "checkpoint.every_n_steps=4",
                            "trainer.val_check_interval=4"), run)
    assert (run / "checkpoints" / "step0000000.ckpt").is_file()
    analysis = analyse_run(run, max_blocks=None)
    assert analysis["checkpoints"][-1]["step"] == 11
    check = analysis["against_training"]
    assert check is not None and check["tokens"] == result["routing"]["tokens"]
    for key in ("dead_frac", "leaf_entropy", "root_right_share"):
        assert check[f"max_abs_diff_{key}"] < 1e-12, (key, check)
    # A seeded sample spread over the split: the same blocks for the same seed, others for another.
    cfg = read_run_config(run)
    a, b, c = (held_out_blocks(cfg, "validation", 4, seed)[0] for seed in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
