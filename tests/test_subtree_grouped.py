"""grouped_tree_ffn (treeffn/layers/subtree_grouped.py) against TreeFFN.forward_masked."""

from __future__ import annotations

import pytest
import torch

from treeffn.layers import subtree_grouped
from treeffn.layers.subtree_grouped import best_split, grouped_tree_ffn, split_cost
from treeffn.layers.tree_ffn import TreeFFN


def make_layer(d, depth, trees, placement="node", activation="gelu", bias=True, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    layer = TreeFFN(d, depth, trees, placement, activation, bias, init_std=0.4).to(dtype)
    layer.track_stats = False
    if bias:
        with torch.no_grad():
            layer.b_in.normal_(std=0.3)
    return layer


def params(layer):
    return [p for p in (layer.w_in, layer.b_in, layer.w_out) if p is not None]


def run_both(layer, x, split=None, upstream=None):
    """(y, path, grads) of forward_masked and of grouped_tree_ffn; grads of x and the parameters."""
    results = []
    for fn in ("masked", "grouped"):
        xi = x.detach().clone().requires_grad_(True)
        for p in params(layer):
            p.grad = None
        if fn == "masked":
            y, path = layer.forward_masked(xi)
        else:
            y, path = grouped_tree_ffn(xi, layer.w_in, layer.b_in, layer.w_out, layer.trees, layer.depth,
                                       layer.placement, layer.act, split=split)
        g = upstream if upstream is not None else torch.ones_like(y)
        y.backward(g)
        grads = [xi.grad] + [p.grad.clone() for p in params(layer)]
        results.append((y.detach(), path, grads))
    return results


def assert_matches_masked(layer, x, split=None, y_tol=1e-10, grad_tol=1e-9):
    upstream = torch.randn(x.shape[0], layer.d_model, dtype=x.dtype)
    (y0, p0, g0), (y1, p1, g1) = run_both(layer, x, split, upstream)
    assert p1.dtype == torch.int64 and p1.shape == (x.shape[0], layer.trees, layer.depth + 1)
    assert torch.equal(p0, p1)
    assert y1.dtype == y0.dtype
    torch.testing.assert_close(y1, y0, atol=y_tol, rtol=0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, atol=grad_tol, rtol=0)
    return p1


CASES = [  # trees, depth, split
    (3, 4, None),
    (2, 4, 1),
    (2, 4, 4),
    (1, 1, 1),
    (4, 1, None),
    (2, 6, 3),
    (1, 5, 2),
    (2, 3, 3),
]


@pytest.mark.parametrize("trees,depth,split", CASES)
@pytest.mark.parametrize("placement", ["node", "post_sum"])
@pytest.mark.parametrize("activation,bias", [("gelu", True), ("relu", False), ("relu", True), ("gelu", False)])
def test_matches_masked_float64(trees, depth, split, placement, activation, bias):
    layer = make_layer(7, depth, trees, placement, activation, bias, seed=trees * 100 + depth * 10 + (split or 0))
    x = torch.randn(37, 7, dtype=torch.float64)
    assert_matches_masked(layer, x, split)


@pytest.mark.parametrize("placement,activation", [("node", "gelu"), ("post_sum", "relu"), ("node", "relu")])
def test_ties_go_left(placement, activation):
    trees, depth, split = 2, 4, 2
    layer = make_layer(5, depth, trees, placement, activation)
    n = layer.nodes
    zero = [0]  # tree 0's root (top part)
    zero += [n + node for node in range(3, 7)]  # tree 1, level 2: the subtree roots
    zero += [n + node for node in range(7, 15)]  # tree 1, level 3: inside the subtrees
    zero += [20]  # a leaf of tree 0
    with torch.no_grad():
        layer.w_in[zero] = 0.0
        layer.b_in[zero] = 0.0
    x = torch.randn(29, 5, dtype=torch.float64)
    path = assert_matches_masked(layer, x, split)
    assert (path[:, 0, 1] == 1).all()  # z = 0 at the root: left
    assert (path[:, 1, 3] == 2 * path[:, 1, 2] + 1).all()
    assert (path[:, 1, 4] == 2 * path[:, 1, 3] + 1).all()


@pytest.mark.parametrize("placement", ["node", "post_sum"])
def test_skewed_and_empty_groups(placement):
    trees, depth, split = 3, 5, 3
    layer = make_layer(6, depth, trees, placement, "gelu")
    n = layer.nodes
    with torch.no_grad():
        layer.b_in[0:7] = 100.0  # tree 0: every token right at every top level -> level-3 node j = 7
        layer.b_in[n:n + 7] = -100.0  # tree 1: every token left -> j = 0
        layer.b_in[2 * n + 1] = 100.0  # tree 2: split at the root, then right on the left side
    x = torch.randn(41, 6, dtype=torch.float64)
    path = assert_matches_masked(layer, x, split)
    assert (path[:, 0, split] == 2 ** (split + 1) - 2).all()
    assert (path[:, 1, split] == 2 ** split - 1).all()
    for tokens in (1, 2):
        assert_matches_masked(layer, x[:tokens], split)


def test_depth_zero_and_no_tokens():
    layer = make_layer(5, 0, 3, "post_sum", "gelu")
    assert_matches_masked(layer, torch.randn(11, 5, dtype=torch.float64))
    layer = make_layer(5, 3, 2)
    y, path = grouped_tree_ffn(torch.zeros(0, 5, dtype=torch.float64), layer.w_in, layer.b_in, layer.w_out,
                               2, 3, "node", layer.act)
    assert y.shape == (0, 5) and path.shape == (0, 2, 4)


def test_best_split():
    assert [best_split(d) for d in range(5)] == [0, 1, 1, 1, 2]
    assert best_split(9) == 5  # 31 top + 31 (padded 32) subtree nodes
    for depth in range(1, 14):
        s = best_split(depth)
        assert 1 <= s <= depth
        assert split_cost(depth, s) == min(split_cost(depth, t) for t in range(1, depth + 1))
        assert abs(s - (depth + 1) / 2) <= 1


def test_bad_arguments():
    layer = make_layer(5, 3, 2)
    x = torch.randn(4, 5, dtype=torch.float64)
    for split in (0, 4, 1.5):
        with pytest.raises(ValueError):
            grouped_tree_ffn(x, layer.w_in, layer.b_in, layer.w_out, 2, 3, "node", layer.act, split=split)
    with pytest.raises(ValueError):
        grouped_tree_ffn(x, layer.w_in, layer.b_in, layer.w_out, 3, 3, "node", layer.act)
    with pytest.raises(ValueError):
        grouped_tree_ffn(x, layer.w_in, layer.b_in, layer.w_out, 2, 3, "leaf", layer.act)


@pytest.fixture
def grouped_mm_calls(monkeypatch):
    """Counts the calls of torch._grouped_mm (still running it)."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not in this torch")
    calls = []
    original = torch._grouped_mm

    def spy(*args, **kwargs):
        calls.append(args[0].dtype)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", spy)
    return calls


@pytest.mark.parametrize("placement,skewed", [("node", False), ("post_sum", False), ("node", True)])
def test_float32_native_grouped_mm(placement, skewed, grouped_mm_calls, monkeypatch):
    layer = make_layer(16, 5, 2, placement, "gelu", dtype=torch.float32, seed=3)
    if skewed:  # tree 0: every token in the rightmost level-2 subtree; tree 1's other groups empty too
        with torch.no_grad():
            layer.b_in[0:3] = 100.0
            layer.b_in[layer.nodes] = -100.0
    x = torch.randn(53, 16)
    (y0, p0, g0), (y1, p1, g1) = run_both(layer, x, split=2)
    assert grouped_mm_calls == [torch.float32] * 2  # the two forward GEMMs (autograd's run in C++)
    assert torch.equal(p0, p1)
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # the loop fallback gives the same in float32
    grouped_mm_calls.clear()
    monkeypatch.setattr(subtree_grouped, "_grouped_mm_supported", lambda *args: False)
    _, (y2, p2, g2) = run_both(layer, x, split=2)
    assert grouped_mm_calls == []
    assert torch.equal(p1, p2)
    torch.testing.assert_close(y2, y1, atol=1e-5, rtol=1e-5)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("placement", ["node", "post_sum"])
def test_autocast_bfloat16(placement, grouped_mm_calls):
    layer = make_layer(32, 6, 2, placement, "gelu", dtype=torch.float32, seed=5)
    x = torch.randn(64, 32)
    y_ref, path_ref = grouped_tree_ffn(x, layer.w_in, layer.b_in, layer.w_out, 2, 6, placement, layer.act)
    grouped_mm_calls.clear()
    xi = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, path = grouped_tree_ffn(xi, layer.w_in, layer.b_in, layer.w_out, 2, 6, placement, layer.act)
        y_masked, _ = layer.forward_masked(x)
    assert y.dtype == y_masked.dtype == torch.bfloat16
    assert grouped_mm_calls == [torch.bfloat16] * 2
    same = (path == path_ref).all(dim=(1, 2))  # a bf16 rounding may flip a near-zero decision
    assert same.float().mean() >= 0.8
    err = (y.float() - y_ref)[same].norm() / y_ref[same].norm()
    assert err < 0.03
    y.float().pow(2).sum().backward()
    assert xi.grad.dtype == torch.float32 and torch.isfinite(xi.grad).all()
    assert layer.w_in.grad.dtype == torch.float32 and torch.isfinite(layer.w_in.grad).all()


def test_tree_impl_grouped_trains_through_the_layer():
    """tree.impl=grouped: the layer's forward runs the grouped path, counts the visits and gives
    the masked path's outputs and gradients."""
    torch.manual_seed(3)
    grouped = TreeFFN(8, 4, 3, impl="grouped").double().train()
    masked = TreeFFN(8, 4, 3, impl="masked").double().train()
    masked.load_state_dict(grouped.state_dict())
    x = torch.randn(40, 8, dtype=torch.float64)
    for layer in (grouped, masked):
        layer.node_visits.zero_()
        layer(x).pow(2).sum().backward()
    torch.testing.assert_close(grouped.w_in.grad, masked.w_in.grad, rtol=1e-9, atol=1e-9)
    assert torch.equal(grouped.node_visits, masked.node_visits)
