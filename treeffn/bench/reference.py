"""The float64 tree layer every fast path is checked against (bench, parity runs, kernel tests).

It computes the layer the plain way: all node pre-activations in one product, the path by the
one descent (treeffn/layers/routing.py), a 0/1 mask of the path nodes, a second product.
"""

from __future__ import annotations

import torch

from treeffn.activations import ACTIVATIONS
from treeffn.layers.routing import global_node_index, route_from_logits


def reference_tree(x, w_in, b_in, w_out, trees, depth, placement, activation, w_up=None, path=None):
    """Float64 tree layer through all node pre-activations and a 0/1 path mask: (y, path (T, K, D+1), z).

    ``path`` given: that path is used instead of the descent (to compare gradients on the same path)."""
    T = x.shape[0]
    z = x @ w_in.T + (b_in if b_in is not None else 0)
    if path is None:
        path = route_from_logits(z.detach(), trees, depth)  # the one descent (treeffn/layers/routing.py)
    rows = global_node_index(path, depth).view(T, -1)
    mask = torch.zeros_like(z).scatter_(1, rows, 1.0)
    act = ACTIVATIONS[activation]
    if w_up is None:
        y = (act(z) * mask) @ w_out if placement == "node" else act((z * mask) @ w_out)
    else:
        u = x @ w_up.T
        y = (act(z) * u * mask) @ w_out if placement == "node" else act((z * mask) @ w_out) * ((u * mask) @ w_out)
    return y, path, z
