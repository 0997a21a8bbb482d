"""The dense MLPs as single modules: the baseline twins of the tree layers.

``DenseFFN`` is fc1 -> activation -> fc2 (OPT, GPT-2); ``GatedDenseFFN`` is
down(act(gate x) * up x) (Llama). ``from_linears`` wraps a model's existing layers (shares their
parameters, copies nothing) and may keep the model's own activation module, so a swapped-back
dense model computes bit for bit what the stock one does.
"""

from __future__ import annotations

import torch
from torch import nn

from treeffn.activations import get_activation


class DenseFFN(nn.Module):
    gated = False

    def __init__(self, d_model: int, ffn_dim: int, activation: str = "gelu", bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(d_model, ffn_dim, bias=bias)
        self.fc2 = nn.Linear(ffn_dim, d_model, bias=bias)
        self.activation = activation
        self.act = get_activation(activation)

    @classmethod
    def from_linears(cls, fc1: nn.Module, fc2: nn.Module, activation: str, act_module: nn.Module | None = None
                     ) -> "DenseFFN":
        """Wrap existing layers (nn.Linear, or GPT-2's transposed Conv1D)."""
        ffn = cls.__new__(cls)
        nn.Module.__init__(ffn)
        ffn.fc1, ffn.fc2, ffn.activation = fc1, fc2, activation
        ffn.act = act_module if act_module is not None else get_activation(activation)
        return ffn

    @property
    def ffn_dim(self) -> int:
        return unit_rows(self.fc1).shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GatedDenseFFN(nn.Module):
    gated = True

    def __init__(self, d_model: int, ffn_dim: int, activation: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, ffn_dim, bias=bias)
        self.up_proj = nn.Linear(d_model, ffn_dim, bias=bias)
        self.down_proj = nn.Linear(ffn_dim, d_model, bias=bias)
        self.activation = activation
        self.act_fn = get_activation(activation)

    @classmethod
    def from_linears(cls, gate: nn.Linear, up: nn.Linear, down: nn.Linear, activation: str,
                     act_module: nn.Module | None = None) -> "GatedDenseFFN":
        ffn = cls.__new__(cls)
        nn.Module.__init__(ffn)
        # Same child names as Llama's MLP: the state-dict keys of a swapped dense model are stock.
        ffn.gate_proj, ffn.up_proj, ffn.down_proj, ffn.activation = gate, up, down, activation
        ffn.act_fn = act_module if act_module is not None else get_activation(activation)
        return ffn

    @property
    def ffn_dim(self) -> int:
        return self.gate_proj.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def unit_rows(layer: nn.Module) -> torch.Tensor:
    """An input projection's weight as (units, d): nn.Linear stores it so, GPT-2's Conv1D transposed."""
    return layer.weight if isinstance(layer, nn.Linear) else layer.weight.t()


def unit_columns(layer: nn.Module) -> torch.Tensor:
    """An output projection's weight as (units, d): row j is unit j's output vector."""
    return layer.weight.t() if isinstance(layer, nn.Linear) else layer.weight


def dense_units(ffn: nn.Module) -> dict:
    """Per-unit tensors of a dense FFN: in (F, d), in_bias (F) or None, up (F, d) or None, out (F, d),
    out_bias (d) or None."""
    if isinstance(ffn, GatedDenseFFN):
        return {"in": unit_rows(ffn.gate_proj), "in_bias": ffn.gate_proj.bias, "up": unit_rows(ffn.up_proj),
                "out": unit_columns(ffn.down_proj), "out_bias": ffn.down_proj.bias}
    return {"in": unit_rows(ffn.fc1), "in_bias": ffn.fc1.bias, "up": None, "out": unit_columns(ffn.fc2),
            "out_bias": ffn.fc2.bias}
