"""Routing statistics are exact on a hand-built tree; `treeffn analyze` on real runs."""

import json
import math

import pytest
import torch

from tests.conftest import run_cli
from treeffn import TreeFFN
from treeffn.analysis.routing import LevelLogits, layer_summary, normalized_leaf_entropy, right_fraction, verdict

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


def test_visits_entropy_dead_nodes_and_logits_are_exact():
    layer = hand_built_tree()
    layer.node_visits.zero_()
    hook = LevelLogits(layer)
    layer(TOKENS)
    hook.remove()
    # Routes: (1,1) 0→2→5; (-1,1) 0→1→4; (-1,-1) 0→1→3; (2,-3) 0→2→6; (3,-1) 0→2→6.
    assert layer.node_visits.tolist() == [5, 2, 3, 1, 1, 1, 2]
    expected_entropy = -(3 * 0.2 * math.log(0.2) + 0.4 * math.log(0.4)) / math.log(4)
    assert normalized_leaf_entropy(layer.node_visits, 1, 2).item() == pytest.approx(expected_entropy, abs=1e-12)
    assert right_fraction(layer.node_visits, 1, 2)[0].tolist() == pytest.approx([3 / 5, 1 / 2, 2 / 3])
    summary = layer_summary(layer.node_visits, 1, 2)
    assert summary["dead_frac"] == 0 and summary["leaves_used"] == 4
    # level 0 sees x0; level 1 sees x1 (left child) or -x1 (right child); leaves have zero weights.
    assert hook.means() == pytest.approx([0.8, 0.6, 0.0])


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
    assert "layer 0:" in out.stdout and "verdicts: balanced if normalized leaf entropy >= 0.75" in out.stdout
    analysis = json.loads((tree_run / "analysis" / "analysis.json").read_text())
    assert [c["step"] for c in analysis["checkpoints"]] == [0, 5, 10, 15, 20]  # step 0: the initial weights
    assert analysis["tokens"] == 8 * 32
    for name in ("entropy_dead_nodes.png", "path_usage_layer0.png", "routing_logit_drift.png"):
        assert (tree_run / "analysis" / name).stat().st_size > 1000
    import csv

    rows = list(csv.DictReader(open(tree_run / "logs" / "csv" / "metrics.csv")))
    assert any(r.get("tree/layer0/static_sparsity") for r in rows)
    assert any(r.get("tree/layer0/logit_level0") for r in rows)

    train(make_cfg(cache_dir, "tree=dense", "trainer.max_steps=5"), dense_run)
    out = run_cli(["analyze", f"run={dense_run}"], cwd=tmp_path)
    assert out.returncode == 0 and "nothing to analyse" in out.stdout and "dense model" in out.stdout
