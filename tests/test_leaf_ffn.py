"""The leaf family (FFF) and the gated node family against independent float64 references."""

import math

import pytest
import torch
import torch.nn.functional as F

from treeffn.analysis.routing import layer_summary
from treeffn.layers import GatedTreeFFN, LeafFFN, auxiliary_loss, routing_mode

D_MODEL = 8


def reference_leaf(layer: LeafFFN, x: torch.Tensor, hard: bool) -> torch.Tensor:
    """Loop over trees and leaves: P(leaf) from the routers on its path, times the leaf's MLP."""
    y = torch.zeros_like(x)
    w = layer.leaf_width
    for k in range(layer.trees):
        for leaf in range(layer.leaves):
            prob = torch.ones(x.shape[0], dtype=x.dtype)
            node = 0
            for level in range(layer.depth):  # the bits of `leaf`, most significant first
                right = (leaf >> (layer.depth - 1 - level)) & 1
                z = x @ layer.router_w[k * layer.routers + node] + layer.router_b[k * layer.routers + node]
                p = (z > 0).to(x.dtype) if hard else torch.sigmoid(z)
                prob = prob * (p if right else 1 - p)
                node = 2 * node + 1 + right
            rows = slice((k * layer.leaves + leaf) * w, (k * layer.leaves + leaf + 1) * w)
            h = layer.act(x @ layer.leaf_in[rows].T + layer.leaf_in_b[rows])
            if layer.gated:
                h = h * (x @ layer.leaf_up[rows].T)
            out = h @ layer.leaf_out[rows] + layer.leaf_out_b[k * layer.leaves + leaf]
            y = y + prob.unsqueeze(1) * out
    return y


def make_leaf(depth=3, width=4, trees=2, gated=False, **kw) -> LeafFFN:
    torch.manual_seed(0)
    layer = LeafFFN(D_MODEL, depth, width, trees=trees, gated=gated, init_std=0.5, **kw).double()
    with torch.no_grad():
        layer.router_b.normal_()
        layer.leaf_in_b.normal_()
        layer.leaf_out_b.normal_()
    return layer


@pytest.mark.parametrize("gated", [False, True])
def test_soft_and_hard_paths_match_the_reference(gated):
    layer = make_leaf(gated=gated)
    x = torch.randn(50, D_MODEL, dtype=torch.float64)
    layer.train()
    torch.testing.assert_close(layer(x), reference_leaf(layer, x, hard=False))
    layer.eval()
    torch.testing.assert_close(layer(x), reference_leaf(layer, x, hard=True))


def test_hard_eval_equals_the_soft_mixture_when_router_probabilities_are_exactly_0_or_1():
    layer = make_leaf(depth=3)
    with torch.no_grad():  # saturated routers: sigmoid is exactly 0 or 1 in float64
        layer.router_w.mul_(1e7)
        layer.router_b.mul_(1e7)
    x = torch.randn(64, D_MODEL, dtype=torch.float64)
    z = x @ layer.router_w.T + layer.router_b
    p = torch.sigmoid(z)
    assert bool(((p == 0) | (p == 1)).all())
    with routing_mode(layer, "soft"):
        soft = layer(x)
    with routing_mode(layer, "hard"):
        hard = layer(x)
    torch.testing.assert_close(hard, soft, rtol=1e-12, atol=1e-12)


def test_soft_training_sends_gradients_to_the_routers_and_hardening_lowers_entropy():
    layer = make_leaf(depth=2, hardening_weight=0.5).train()
    x = torch.randn(40, D_MODEL, dtype=torch.float64)
    y = layer(x)
    z = x @ layer.router_w.T + layer.router_b
    p = torch.sigmoid(z)
    expected = -(p * p.log() + (1 - p) * (1 - p).log()).mean()
    torch.testing.assert_close(layer.last_router_entropy, expected)
    aux = auxiliary_loss(layer)
    torch.testing.assert_close(aux, 0.5 * expected)
    (y.pow(2).mean() + aux).backward()
    assert layer.router_w.grad.abs().sum() > 0 and layer.router_b.grad.abs().sum() > 0
    # A few steps on the hardening loss alone make the routers more decisive.
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    before = float(expected.detach())
    for _ in range(20):
        opt.zero_grad()
        layer(x)
        auxiliary_loss(layer).backward()
        opt.step()
    layer(x)
    assert float(layer.last_router_entropy.detach()) < before


def test_auto_routing_is_soft_in_train_and_hard_in_eval_and_visits_are_counted():
    layer = make_leaf(depth=3, trees=2)
    x = torch.randn(30, D_MODEL, dtype=torch.float64)
    layer.train()
    torch.testing.assert_close(layer(x), reference_leaf(layer, x, hard=False))
    layer.eval()
    layer.node_visits.zero_()
    layer(x)
    assert int(layer.node_visits.sum()) == 30 * 2 * (3 + 1)  # D routers + 1 leaf per tree
    assert int(layer.node_visits.view(2, -1)[:, 0].sum()) == 60  # every token passes each root
    summary = layer_summary(layer.node_visits, layer.trees, layer.depth)
    assert 0 <= summary["dead_frac"] <= 1 and summary["leaves_used"] >= 1


def test_depth_zero_leaf_layer_is_a_dense_mlp():
    layer = make_leaf(depth=0, width=6, trees=1).eval()
    x = torch.randn(10, D_MODEL, dtype=torch.float64)
    dense = F.gelu(x @ layer.leaf_in.T + layer.leaf_in_b) @ layer.leaf_out + layer.leaf_out_b[0]
    torch.testing.assert_close(layer(x), dense)
    assert layer.total_units == 6 and layer.active_units == 6


def reference_gated_tree(layer: GatedTreeFFN, x: torch.Tensor) -> torch.Tensor:
    ys = []
    for t in range(x.shape[0]):
        gate_sum = up_sum = out = 0
        for k in range(layer.trees):
            node = 0
            for _ in range(layer.depth + 1):
                row = k * layer.nodes + node
                z = x[t] @ layer.w_in[row] + (layer.b_in[row] if layer.b_in is not None else 0)
                u = x[t] @ layer.w_up[row]
                out = out + layer.act(z) * u * layer.w_out[row]
                gate_sum = gate_sum + z * layer.w_out[row]
                up_sum = up_sum + u * layer.w_out[row]
                node = 2 * node + 1 + int(z > 0)
        ys.append(out if layer.placement == "node" else layer.act(gate_sum) * up_sum)
    return torch.stack(ys)


@pytest.mark.parametrize("placement", ["node", "post_sum"])
def test_gated_tree_masked_and_gather_paths_match_the_reference(placement):
    torch.manual_seed(1)
    layer = GatedTreeFFN(D_MODEL, depth=2, trees=3, placement=placement, bias=True, init_std=0.5).double()
    x = torch.randn(20, D_MODEL, dtype=torch.float64)
    expected = reference_gated_tree(layer, x)
    layer.train()
    torch.testing.assert_close(layer(x), expected)
    layer.eval()
    torch.testing.assert_close(layer(x), expected)
    layer.train()
    layer(x).sum().backward()
    assert layer.w_up.grad.abs().sum() > 0
    assert math.isclose(sum(p.numel() for p in layer.parameters()), 3 * 7 * (3 * D_MODEL + 1))


def test_gated_tree_refuses_the_triton_kernel():
    with pytest.raises(ValueError, match="no Triton kernel"):
        GatedTreeFFN(D_MODEL, 2, 1, impl="triton")


def test_walk_reports_the_hard_path_in_the_node_family_format():
    layer = make_leaf(depth=2, trees=2).eval()
    x = torch.randn(6, D_MODEL, dtype=torch.float64)
    rows, z = layer.walk(x)
    assert rows.shape == z.shape == (6, 2, 3)
    leaf = layer.hard_leaves(x)
    assert torch.equal(rows[:, :, -1] - torch.tensor([0, 7]), leaf + layer.routers)
    assert torch.isnan(z[:, :, -1]).all() and torch.isfinite(z[:, :, :-1]).all()
    assert torch.equal((z[:, :, 0] > 0).long() + 1, rows[:, :, 1] - torch.tensor([0, 7]))
