"""The gated tree layer: the node family (docs/design.md) for Llama-style gated MLPs.

A Llama MLP is ``down(act(gate x) * up x)``: unit j has a gate row g_j, an up row u_j and an
output column v_j. A *gated tree* keeps the tree of the node family and gives every node all
three vectors:

    gate pre-activation  z_n = g_n . x + b_n      (routing reads its sign: right iff z_n > 0)
    up projection        u_n = u_n . x
    placement "node":     y = sum over path nodes of  act(z_n) * u_n * v_n
                          (exactly a Llama MLP restricted to the D+1 path units of each tree)
    placement "post_sum": y = act( sum_path z_n v_n ) * ( sum_path u_n v_n )
                          (our definition: the activation moves after the sum as in the
                          non-gated post_sum, so a node's gradient does not depend on the sign
                          of its own z_n; the up branch is summed over the same path)

The path is the stop-gradient hard path of the node family. Parameters: the node family's
``w_in`` (gate rows), ``b_in`` and ``w_out``, plus ``w_up`` (K*N, d), same order. Training has
no Triton kernel (``impl=triton`` is refused); ``impl=auto`` runs masked in training, and at
inference the one-launch decode kernel (treeffn/kernels/triton_decode.py) on CUDA for up to
64 tokens a call, masked above; on the CPU the rule of ``treeffn.kernels.auto_impl``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from treeffn.layers.path_ops import row_dots, weighted_rows
from treeffn.layers.routing import path_from_mask, path_mask
from treeffn.layers.tree_ffn import TreeFFN


class GatedTreeFFN(TreeFFN):
    gated = True

    def __init__(self, d_model: int, depth: int, trees: int, placement: str = "node", activation: str = "silu",
                 bias: bool = False, impl: str = "auto", init_std: float = 0.02):
        if impl in ("triton", "grouped"):
            what = "Triton kernel" if impl == "triton" else "grouped path"
            raise ValueError(f"gated trees have no {what}; use impl=auto, masked or gather")
        super().__init__(d_model, depth, trees, placement=placement, activation=activation, bias=bias,
                         impl=impl, init_std=init_std)
        self.w_up = nn.Parameter(torch.empty(self.total_nodes, d_model))
        nn.init.normal_(self.w_up, std=init_std)

    def reset_parameters(self, std: float = 0.02) -> None:
        super().reset_parameters(std)
        if getattr(self, "w_up", None) is not None:  # TreeFFN.__init__ calls this before w_up exists
            nn.init.normal_(self.w_up, std=std)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", gated=True"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self._flat(x)
        impl = self.impl if self.impl != "auto" else self._auto_impl(flat)
        if impl == "decode":
            from treeffn.kernels import tree_decode

            if not torch.is_autocast_enabled("cuda") and flat.dtype == self.w_in.dtype:
                y, path = tree_decode(flat, self.w_in, self.b_in, self.w_out, self.trees, self.depth,
                                      self.placement, self.activation, w_up=self.w_up)
            else:  # under autocast, as F.linear would: inputs and weights in the autocast dtype
                dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else flat.dtype
                with torch.autocast(device_type="cuda", enabled=False):
                    w = [t.to(dtype) if t is not None else None for t in (self.w_in, self.b_in, self.w_out, self.w_up)]
                    y, path = tree_decode(flat.to(dtype), w[0], w[1], w[2], self.trees, self.depth, self.placement,
                                          self.activation, w_up=w[3])
        else:
            y, path = self._masked_or_gather(flat, impl)
        return self._counted(y, path, x.shape)

    def _auto_impl(self, x: torch.Tensor) -> str:
        """impl=auto: masked in training; at inference the decode kernel on CUDA up to
        DECODE_MAX_TOKENS tokens (masked above: the gather walk is 50-100x slower than dense on a
        GPU), and on the CPU what ``treeffn.kernels.auto_impl`` picks (gather or masked)."""
        from treeffn.kernels import auto_impl, triton_available

        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.w_in.requires_grad)
        if self.training or needs_grad:
            return "masked"
        if x.is_cuda:
            from treeffn.kernels import DECODE_MAX_TOKENS

            return "decode" if x.shape[0] <= DECODE_MAX_TOKENS and triton_available() else "masked"
        return auto_impl(x, training=False)

    def forward_masked(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = F.linear(x, self.w_in, self.b_in)
        up = F.linear(x, self.w_up)
        mask = path_mask(z.detach(), self.trees, self.depth)
        path = path_from_mask(mask, self.depth)
        mask = mask.view(z.shape).to(z.dtype)  # float products: cheaper than with a bool on the CPU
        if self.placement == "node":
            return (self.act(z) * up * mask) @ self.w_out, path
        return self.act((z * mask) @ self.w_out) * ((up * mask) @ self.w_out), path

    def _gather_chunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = x.shape[0]
        rows, z = self.walk(x)  # the gate routes; (T, K, D+1) each
        ups = torch.stack([row_dots(self.w_up, rows[:, :, level], x) for level in range(self.depth + 1)], dim=2)
        rows_t, z_t, u_t = rows.reshape(tokens, -1), z.reshape(tokens, -1), ups.reshape(tokens, -1)
        if self.placement == "node":
            y = weighted_rows(self.w_out, rows_t, self.act(z_t) * u_t)
        else:
            y = self.act(weighted_rows(self.w_out, rows_t, z_t)) * weighted_rows(self.w_out, rows_t, u_t)
        offsets = torch.arange(self.trees, device=x.device).view(1, -1, 1) * self.nodes
        return y.to(x.dtype), rows - offsets
