"""The dense MLP (fc1 -> activation -> fc2) as one module: the baseline twin of TreeFFN."""

from __future__ import annotations

import torch
from torch import nn

from treeffn.layers.activations import get_activation


class DenseFFN(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int, activation: str = "gelu", bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(d_model, ffn_dim, bias=bias)
        self.fc2 = nn.Linear(ffn_dim, d_model, bias=bias)
        self.activation = activation
        self.act = get_activation(activation)

    @classmethod
    def from_linears(cls, fc1: nn.Linear, fc2: nn.Linear, activation: str) -> "DenseFFN":
        """Wrap existing layers (shares their parameters, copies nothing)."""
        ffn = cls.__new__(cls)
        nn.Module.__init__(ffn)
        ffn.fc1, ffn.fc2, ffn.activation, ffn.act = fc1, fc2, activation, get_activation(activation)
        return ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
