"""The path-only (gather) forms of the tree layers in half precision: float32 sums, and a backward
that does not need embedding_bag's per-sample-weight gradient (no bf16 CUDA kernel for it)."""

import pytest
import torch
import torch.nn.functional as F

from treeffn import GatedTreeFFN, LeafFFN, TreeFFN
from treeffn.bench.problems import check_tree, make_tree


@pytest.fixture
def cuda_like_embedding_bag(monkeypatch):
    """embedding_bag as on CUDA: no bf16 backward for per_sample_weights. Fails loudly if used."""
    real = F.embedding_bag

    def guarded(*args, **kwargs):
        weights = kwargs.get("per_sample_weights")
        if weights is not None and weights.dtype in (torch.bfloat16, torch.float16):
            raise NotImplementedError('"_embedding_bag_per_sample_weights_backward_cuda" not implemented for '
                                      "'BFloat16'")
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "embedding_bag", guarded)


@pytest.mark.parametrize("layer_cls", [TreeFFN, GatedTreeFFN])
@pytest.mark.parametrize("placement", ["node", "post_sum"])
def test_gather_trains_in_bf16(layer_cls, placement, cuda_like_embedding_bag):
    torch.manual_seed(0)
    layer = layer_cls(32, 3, 4, placement=placement, impl="gather").to(torch.bfloat16).train()
    x = torch.randn(6, 32, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().pow(2).sum().backward()
    for p in (x, layer.w_in, layer.w_out):
        assert p.grad is not None and p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad.float()).all()


def test_leaf_hard_path_in_bf16(cuda_like_embedding_bag):
    layer = LeafFFN(32, 2, 4, trees=3).to(torch.bfloat16).eval()
    y = layer(torch.randn(5, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


def test_gather_bf16_error_is_not_worse_than_masked():
    """Against float64 with the routing forced to each path's own choice (bench's check): the gather
    path sums in float32 and rounds once, so its error is at most the masked path's."""
    torch.manual_seed(0)
    layer = make_tree(128, 6, 5, torch.device("cpu"), torch.bfloat16, "node")
    gather = max(check_tree("gather", layer, 24, "fwd", torch.bfloat16, torch.device("cpu"))["rel_err"]["y"]
                 for _ in range(3))
    masked = min(check_tree("masked", layer, 24, "fwd", torch.bfloat16, torch.device("cpu"))["rel_err"]["y"]
                 for _ in range(3))
    assert gather <= 1.1 * masked, (gather, masked)
    assert gather < 4e-3


def test_float32_gather_path_is_unchanged():
    """fp32 keeps embedding_bag (the fastest CPU path) and matches masked to rounding."""
    torch.manual_seed(0)
    layer = TreeFFN(16, 3, 2).double()
    x = torch.randn(7, 16, dtype=torch.float64)
    torch.testing.assert_close(layer.forward_gather(x)[0], layer.forward_masked(x)[0], rtol=1e-12, atol=1e-12)
