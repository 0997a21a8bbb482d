"""The forward pass of a causal LM for generation, with a static KV cache owned here.

``StaticDecoder(model, batch_size, max_len)`` reads the weights of a Hugging Face OPT, GPT-2 or
Llama model (stock, or with treeffn's dense / tree FFN modules swapped in) and runs its forward
on its own: embeddings, attention over a preallocated KV cache, norms, the model's FFN modules
as they are, the LM head on the last position. It does not call the Hugging Face model's
forward, because that forward is not safe to capture in a CUDA graph (transformers 5.17: mask
creation, lazily allocated static caches and cache-length bookkeeping on the host).

What makes a step capturable (treeffn/generation/capture.py checks it on the CPU too):

* every shape is fixed: the cache is (2, batch, kv heads, max_len rounded up to 16, head dim)
  per layer, attention reads all its positions and a mask hides those after the current one;
* the position is a 1-element device tensor, never a Python int: no host synchronisation, and
  a captured graph reads the new value on every replay;
* the cache is written with ``index_copy_`` at those positions (no slicing by a host value);
* the mask is computed from the position tensor inside the step.

The numerics follow the Hugging Face modules (same operations per family, e.g. OPT scales q
after its projection); on the CPU in float32 greedy output is token-identical to ``generate()``
(tests/test_generation.py). q, k and v projections are fused into one matrix product per layer
(one launch instead of three, for dense and tree models alike).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from treeffn.layers import DENSE_LAYER_TYPES, TREE_LAYER_TYPES
from treeffn.models.families import find_decoder_layers

OURS = (*TREE_LAYER_TYPES, *DENSE_LAYER_TYPES)


@dataclass
class AttentionWeights:
    """One layer's attention, in the form the step uses."""
    qkv_weight: torch.Tensor        # (q + 2 kv widths, d), rows q | k | v
    qkv_bias: torch.Tensor | None
    out: nn.Module                  # the output projection module (Linear, or GPT-2's Conv1D)
    heads: int
    kv_heads: int
    head_dim: int
    scale: float                    # applied to the scores (SDPA's ``scale``)
    q_scale: float = 1.0            # applied to q after its projection (OPT's order)


def _linear_parts(*linears: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenated (out, in) weights and biases of nn.Linear layers (None when none has a bias)."""
    weight = torch.cat([m.weight for m in linears]).detach()
    biases = [m.bias for m in linears]
    if all(b is None for b in biases):
        return weight, None
    bias = torch.cat([b if b is not None else torch.zeros(m.weight.shape[0], device=weight.device, dtype=weight.dtype)
                      for m, b in zip(linears, biases)]).detach()
    return weight, bias


def _ffn_callable(family: str, layer: nn.Module):
    """The decoder layer's MLP as one callable on (B, S, d): our module where one is swapped in,
    else the stock modules in the stock order."""
    if family == "opt":
        if isinstance(layer.fc1, OURS):
            return layer.fc1
        return lambda h: layer.fc2(layer.activation_fn(layer.fc1(h)))
    mlp = layer.mlp
    if family == "gpt2" and isinstance(mlp.c_fc, OURS):
        return mlp.c_fc  # act / c_proj are identities; dropout is off in eval
    return mlp


class StaticDecoder:
    """``forward(ids (B, S), pos (1,) int64)`` -> logits (B, vocab) of the last position, writing
    the KV cache at positions pos .. pos+S-1. B and the cache length are fixed at construction."""

    def __init__(self, model: nn.Module, batch_size: int, max_len: int):
        family, layers = find_decoder_layers(model)
        self.family = family.name
        self.model = model
        self.batch_size, self.max_len = int(batch_size), int(max_len)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        cfg = model.config
        self.layers = layers
        self.attn = [self._attention_weights(i, layer, cfg) for i, layer in enumerate(layers)]
        self.ffn = [_ffn_callable(self.family, layer) for layer in layers]
        a = self.attn[0]
        limit = self.position_limit_of(model)
        if self.max_len > limit:
            raise ValueError(f"{self.max_len} positions requested; the model has {limit}")
        # keys and values of a layer in one tensor (one index_copy_ writes both); the length is
        # rounded up to a multiple of 16 (the memory-efficient attention kernel pads its bias to
        # that otherwise, on every call); positions past max_len are never written and stay masked
        self.cache_len = -(-self.max_len // 16) * 16
        shape = (2, self.batch_size, a.kv_heads, self.cache_len, a.head_dim)
        self.cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in layers]
        self.key_pos = torch.arange(self.cache_len, device=self.device)

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def position_limit_of(model: nn.Module) -> int:
        """Positions the model can embed (OPT / GPT-2: learned; Llama: its configured maximum)."""
        cfg = model.config
        return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 1 << 30)

    def _attention_weights(self, index: int, layer: nn.Module, cfg) -> AttentionWeights:
        if self.family == "opt":
            at = layer.self_attn
            heads = cfg.num_attention_heads
            hd = cfg.hidden_size // heads
            w, b = _linear_parts(at.q_proj, at.k_proj, at.v_proj)
            q_scale = hd**-0.5
            if math.frexp(q_scale)[0] == 0.5:
                # a power of two (head dim 4, 16, 64, 256): scaling the q rows is exact, so fold
                # it into the weights (one launch less per layer), bit for bit the same q
                w[: heads * hd] *= q_scale
                if b is not None:
                    b[: heads * hd] *= q_scale
                q_scale = 1.0
            return AttentionWeights(w, b, at.out_proj, heads, heads, hd, scale=1.0, q_scale=q_scale)
        if self.family == "gpt2":
            at = layer.attn
            heads = cfg.num_attention_heads
            hd = cfg.hidden_size // heads
            scale = hd**-0.5 if cfg.scale_attn_weights else 1.0
            if cfg.scale_attn_by_inverse_layer_idx:
                scale /= float(index + 1)
            # Conv1D keeps (in, out): the fused product is already there.
            return AttentionWeights(at.c_attn.weight.detach().t(), at.c_attn.bias.detach(), at.c_proj, heads, heads,
                                    hd, scale=scale)
        at = layer.self_attn  # llama
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        w, b = _linear_parts(at.q_proj, at.k_proj, at.v_proj)
        return AttentionWeights(w, b, at.o_proj, heads, kv_heads, hd, scale=hd**-0.5)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        B, S = ids.shape
        positions = pos + torch.arange(S, device=ids.device)  # (S,) on the device
        # (S, cache_len) additive mask, made once for all layers: 0 for the past and self, -inf after
        allowed = self.key_pos[None, :] <= positions[:, None]
        mask = torch.where(allowed, 0.0, float("-inf")).to(self.dtype)
        inner = self.model.model if self.family in ("opt", "llama") else self.model.transformer
        if self.family == "opt":
            dec = inner.decoder
            h = F.embedding(ids, dec.embed_tokens.weight)
            if dec.project_in is not None:
                h = dec.project_in(h)
            h = h + F.embedding(positions + dec.embed_positions.offset, dec.embed_positions.weight)
            h = self._opt_layers(h, positions, mask)
            if dec.final_layer_norm is not None:
                h = dec.final_layer_norm(h[:, -1])
            else:
                h = h[:, -1]
            if dec.project_out is not None:
                h = dec.project_out(h)
        elif self.family == "gpt2":
            h = F.embedding(ids, inner.wte.weight) + F.embedding(positions, inner.wpe.weight)
            for i, layer in enumerate(self.layers):
                h = h + self._attend(i, layer.ln_1(h), positions, mask)
                h = h + self.ffn[i](layer.ln_2(h))
            h = inner.ln_f(h[:, -1])
        else:
            h = F.embedding(ids, inner.embed_tokens.weight)
            cos, sin = inner.rotary_emb(h, positions[None, :])
            rope = (cos.unsqueeze(1), sin.unsqueeze(1))  # (1, 1, S, head_dim)
            for i, layer in enumerate(self.layers):
                h = h + self._attend(i, layer.input_layernorm(h), positions, mask, rope)
                h = h + self.ffn[i](layer.post_attention_layernorm(h))
            h = inner.norm(h[:, -1])
        return self.model.lm_head(h)

    def _opt_layers(self, h, positions, mask):
        for i, layer in enumerate(self.layers):
            pre = layer.do_layer_norm_before
            a = self._attend(i, layer.self_attn_layer_norm(h) if pre else h, positions, mask)
            h = h + a
            if not pre:
                h = layer.self_attn_layer_norm(h)
            f = self.ffn[i](layer.final_layer_norm(h) if pre else h)
            h = h + f
            if not pre:
                h = layer.final_layer_norm(h)
        return h

    def _attend(self, i: int, h, positions, mask, rope=None):
        a = self.attn[i]
        B, S, _ = h.shape
        qkv = F.linear(h, a.qkv_weight, a.qkv_bias)
        q_w, kv_w = a.heads * a.head_dim, a.kv_heads * a.head_dim
        q, k, v = qkv.split((q_w, kv_w, kv_w), dim=-1)
        if a.q_scale != 1.0:
            q = q * a.q_scale
        q = q.view(B, S, a.heads, a.head_dim).transpose(1, 2)
        k = k.view(B, S, a.kv_heads, a.head_dim).transpose(1, 2)
        v = v.view(B, S, a.kv_heads, a.head_dim).transpose(1, 2)
        cache = self.cache[i]
        if rope is not None:
            cos, sin = rope
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            cache[0].index_copy_(2, positions, k)
            cache[1].index_copy_(2, positions, v)
        else:  # k and v straight from the fused product: one copy into the cache
            kv = qkv[..., q_w:].view(B, S, 2, a.kv_heads, a.head_dim).permute(2, 0, 3, 1, 4)
            cache.index_copy_(3, positions, kv)
        out = F.scaled_dot_product_attention(q, cache[0], cache[1], attn_mask=mask, scale=a.scale,
                                             enable_gqa=a.kv_heads != a.heads)
        return a.out(out.transpose(1, 2).reshape(B, S, a.heads * a.head_dim))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
