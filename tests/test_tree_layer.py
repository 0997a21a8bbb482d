"""The tree layer against an independent float64 reference, both placements, both paths."""

import pytest
import torch
import torch.nn.functional as F

from treeffn import TreeFFN
from treeffn.layers import matched_trees, tree_ffn_parameter_count

ACTS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "identity": lambda z: z}


def reference_tree_ffn(x, w_in, b_in, w_out, trees, depth, placement, act):
    """Token by token, tree by tree, walking the heap with Python integers."""
    n_nodes = 2 ** (depth + 1) - 1
    outputs, visited = [], set()
    for t in range(x.shape[0]):
        acc = torch.zeros(w_out.shape[1], dtype=x.dtype)
        pre = torch.zeros(w_out.shape[1], dtype=x.dtype)
        for k in range(trees):
            node = 0
            for _level in range(depth + 1):
                row = k * n_nodes + node
                visited.add(row)
                z = torch.dot(w_in[row], x[t]) + (b_in[row] if b_in is not None else 0.0)
                if placement == "node":
                    acc = acc + act(z) * w_out[row]
                else:
                    pre = pre + z * w_out[row]
                node = 2 * node + (2 if z.item() > 0 else 1)  # right iff z > 0; ties go left
        outputs.append(acc if placement == "node" else act(pre))
    return torch.stack(outputs), visited


def random_layer(d, depth, trees, placement, activation, bias):
    layer = TreeFFN(d, depth, trees, placement=placement, activation=activation, bias=bias).double()
    with torch.no_grad():  # larger than the 0.02 init so routing and nonlinearity both matter
        layer.w_in.normal_(0, 1)
        layer.w_out.normal_(0, 1)
        if bias:
            layer.b_in.normal_(0, 0.5)
    return layer


@pytest.mark.parametrize("placement", ["node", "post_sum"])
@pytest.mark.parametrize("activation", ["gelu", "relu", "silu", "identity"])
@pytest.mark.parametrize("shape", [(1, 4, 3, True), (3, 7, 2, False), (0, 5, 1, True), (2, 1, 4, True)])
def test_matches_reference_outputs_and_gradients(placement, activation, shape):
    depth, d, trees, bias = shape
    layer = random_layer(d, depth, trees, placement, activation, bias)
    x = torch.randn(2, 3, d, dtype=torch.float64)
    flat = x.reshape(-1, d)

    ref_params = [p.detach().clone().requires_grad_(True) for p in (layer.w_in, layer.b_in, layer.w_out) if p is not None]
    w_in, w_out = ref_params[0], ref_params[-1]
    b_in = ref_params[1] if bias else None
    x_ref = flat.clone().requires_grad_(True)
    y_ref, visited = reference_tree_ffn(x_ref, w_in, b_in, w_out, trees, depth, placement, ACTS[activation])
    g = torch.randn_like(y_ref)
    (y_ref * g).sum().backward()

    for mode in ("train", "eval"):
        getattr(layer, mode)()
        layer.zero_grad()
        x_in = x.clone().requires_grad_(True)
        y = layer(x_in)
        assert y.shape == x.shape
        torch.testing.assert_close(y.reshape(-1, d), y_ref, rtol=1e-10, atol=1e-10)
        (y.reshape(-1, d) * g).sum().backward()
        torch.testing.assert_close(x_in.grad.reshape(-1, d), x_ref.grad, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(layer.w_in.grad, w_in.grad, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(layer.w_out.grad, w_out.grad, rtol=1e-10, atol=1e-10)
        if bias:
            torch.testing.assert_close(layer.b_in.grad, b_in.grad, rtol=1e-10, atol=1e-10)
        # Nodes no token visited get exactly zero gradient.
        off_path = [r for r in range(layer.total_nodes) if r not in visited]
        if off_path:
            assert layer.w_in.grad[off_path].abs().max() == 0
            assert layer.w_out.grad[off_path].abs().max() == 0


def test_training_and_inference_paths_agree_on_many_tokens():
    torch.manual_seed(0)
    layer = random_layer(16, 5, 3, "node", "gelu", True)
    x = torch.randn(4000, 16, dtype=torch.float64)
    y_masked, path_masked = layer.forward_masked(x)
    y_gather, path_gather = layer.forward_gather(x)
    assert torch.equal(path_masked, path_gather)
    torch.testing.assert_close(y_masked, y_gather, rtol=1e-12, atol=1e-12)


def test_gather_path_chunks_long_inputs(monkeypatch):
    import treeffn.layers.path_ops as mod

    monkeypatch.setattr(mod, "GATHER_CHUNK_ELEMENTS", 64)
    layer = random_layer(8, 3, 2, "post_sum", "gelu", True)
    x = torch.randn(37, 8, dtype=torch.float64)
    torch.testing.assert_close(layer.forward_gather(x)[0], layer.forward_masked(x)[0], rtol=1e-12, atol=1e-12)


def test_ties_go_left():
    layer = TreeFFN(4, 2, 1).double()
    with torch.no_grad():
        layer.w_in.zero_()
        layer.b_in.zero_()  # every z is exactly 0
    layer.eval()
    layer.node_visits.zero_()
    layer(torch.randn(5, 4, dtype=torch.float64))
    # leftmost path: nodes 0, 1, 3
    assert layer.node_visits.tolist() == [5, 5, 0, 5, 0, 0, 0]


def test_visit_counts_follow_the_paths():
    layer = random_layer(6, 3, 2, "node", "gelu", True)
    x = torch.randn(50, 6, dtype=torch.float64)
    layer.node_visits.zero_()
    layer.eval()
    layer(x)
    _, visited = reference_tree_ffn(x, layer.w_in, layer.b_in, layer.w_out, 2, 3, "node", F.gelu)
    counts = layer.node_visits.view(2, 15)
    assert set(torch.nonzero(layer.node_visits).flatten().tolist()) == visited
    assert counts[:, 0].tolist() == [50, 50]  # every token passes each root
    for level in range(4):  # and exactly one node per level
        lo, hi = 2**level - 1, 2 ** (level + 1) - 1
        assert counts[:, lo:hi].sum(dim=1).tolist() == [50, 50]


@pytest.mark.parametrize("placement", ["node", "post_sum"])
def test_training_statistics_from_the_mask_equal_the_walks(placement):
    """The masked pass counts visits and per-level logit sums from its path mask (column sums);
    the gather pass from the walked paths: the same numbers for the same tokens."""
    torch.manual_seed(1)
    layer = random_layer(6, 4, 3, placement, "gelu", True)
    x = torch.randn(300, 6, dtype=torch.float64)
    x[:7] = 0  # ties at the nodes whose bias is <= 0
    stats = {}
    for mode, impl in (("train", "masked"), ("eval", "gather")):
        layer.impl = impl
        getattr(layer, mode)()
        layer.node_visits.zero_()
        layer.level_logits.zero_()
        layer(x)
        stats[impl] = (layer.node_visits.clone(), layer.level_logits.clone())
    assert torch.equal(stats["masked"][0], stats["gather"][0])
    assert stats["masked"][0].view(3, -1)[:, 0].tolist() == [300, 300, 300]
    torch.testing.assert_close(stats["masked"][1], stats["gather"][1], rtol=1e-5, atol=1e-4)
    assert stats["masked"][1][1].tolist() == [900.0] * 5


def test_parameter_count_and_active_fraction():
    layer = TreeFFN(768, 6, 24)
    assert layer.total_nodes == 3048 and layer.active_nodes == 168
    assert abs(layer.active_fraction - 168 / 3048) < 1e-12
    assert sum(p.numel() for p in layer.parameters()) == tree_ffn_parameter_count(768, 6, 24) == 3048 * (2 * 768 + 1)
    assert matched_trees(3072, 6) == 24 and matched_trees(3072, 7) == 12
    assert matched_trees(8192, 6) == 64 and matched_trees(8192, 7) == 32


@pytest.mark.parametrize("kwargs, fragment", [
    ({"depth": -1}, "depth"), ({"trees": 0}, "trees"), ({"placement": "middle"}, "placement"),
    ({"activation": "swish2"}, "activation"), ({"impl": "cuda"}, "impl"),
])
def test_constructor_rejects_bad_arguments(kwargs, fragment):
    args = {"d_model": 8, "depth": 2, "trees": 1, **kwargs}
    with pytest.raises(ValueError, match=fragment):
        TreeFFN(**args)


def test_config_and_layer_agree_on_activation_names():
    from treeffn import config
    from treeffn.layers import ACTIVATIONS

    assert set(config.ACTIVATIONS) == set(ACTIVATIONS)
