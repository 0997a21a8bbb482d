"""The Hugging Face model families treeffn can swap MLPs in, and where each keeps its MLP.

One ``Family`` record per supported decoder-layer class says:

* where the FFN lives and how to put ours there so that norms, dropout and residuals stay as
  the stock model has them;
  - OPT (transformers 5.x): the MLP runs inline in ``OPTDecoderLayer.forward`` as
    ``fc2(activation_fn(fc1(h)))``: our FFN goes into ``fc1``; ``activation_fn``/``fc2`` become identities.
  - GPT-2: ``GPT2MLP`` is ``dropout(c_proj(act(c_fc(h))))``: our FFN goes into ``c_fc``;
    ``act``/``c_proj`` become identities, so the residual dropout stays.
  - Llama: ``LlamaMLP`` is ``down(act(gate h) * up h)`` with no dropout: the whole ``mlp``
    submodule is replaced (our FFN is gated: see treeffn/layers/gated_tree_ffn.py).
* how to build the family's Hugging Face config from a preset (conf/model/*.yaml), no download.

Anything else fails with a clear error instead of silently training the stock MLP.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from torch import nn

from treeffn.layers.dense_ffn import DenseFFN, GatedDenseFFN

# our activation names -> Hugging Face ACT2FN names
HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu", "tanh": "tanh",
                 "identity": "linear"}


@dataclass(frozen=True)
class Family:
    name: str                 # model.family and the dense checkpoint's model_type
    layer_class: str          # module:Class of the decoder layer
    lm_class: str             # module:Class of the causal LM
    config_class: str         # module:Class of the config
    ffn_path: str             # where the swapped FFN sits, relative to a decoder layer
    gated: bool
    # Dense wrapper child -> stock path (relative to the layer): maps a dense model's state dict
    # back to stock keys when it is saved.
    stock_names: dict = field(default_factory=dict)
    attention: str = ""       # name of the attention submodule of a layer (model.freeze=attention)

    def load(self, which: str):
        module, name = getattr(self, which).split(":")
        return getattr(importlib.import_module(module), name)


FAMILIES = {
    "opt": Family("opt", "transformers.models.opt.modeling_opt:OPTDecoderLayer",
                  "transformers.models.opt.modeling_opt:OPTForCausalLM",
                  "transformers.models.opt.configuration_opt:OPTConfig", ffn_path="fc1", gated=False,
                  stock_names={"fc1.fc1": "fc1", "fc1.fc2": "fc2"}, attention="self_attn"),
    "gpt2": Family("gpt2", "transformers.models.gpt2.modeling_gpt2:GPT2Block",
                   "transformers.models.gpt2.modeling_gpt2:GPT2LMHeadModel",
                   "transformers.models.gpt2.configuration_gpt2:GPT2Config", ffn_path="mlp.c_fc", gated=False,
                   stock_names={"mlp.c_fc.fc1": "mlp.c_fc", "mlp.c_fc.fc2": "mlp.c_proj"}, attention="attn"),
    "llama": Family("llama", "transformers.models.llama.modeling_llama:LlamaDecoderLayer",
                    "transformers.models.llama.modeling_llama:LlamaForCausalLM",
                    "transformers.models.llama.configuration_llama:LlamaConfig", ffn_path="mlp", gated=True,
                    stock_names={}, attention="self_attn"),  # GatedDenseFFN keeps Llama's child names
}


# ------------------------------------------------------------------------------ finding layers
def find_decoder_layers(model: nn.Module) -> tuple[Family, list[nn.Module]]:
    """The family of ``model`` and its decoder layers, or a TypeError naming what is supported."""
    classes = {f.name: f.load("layer_class") for f in FAMILIES.values()}
    for fam in FAMILIES.values():
        layers = [m for m in model.modules() if isinstance(m, classes[fam.name])]
        if layers:
            return fam, layers
    names = ", ".join(f.layer_class.split(":")[1] for f in FAMILIES.values())
    raise TypeError(f"{type(model).__name__} has no decoder layer treeffn knows how to swap; supported: {names}")


def get_ffn(family: Family, layer: nn.Module) -> nn.Module | None:
    """The module at the family's FFN place in ``layer`` (None if the layer has no such place)."""
    module = layer
    for part in family.ffn_path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def activation_name(module: nn.Module) -> str:
    """Our name for a Hugging Face activation module (the inverse of HF_ACTIVATION)."""
    from transformers import activations as hf

    checks = [("gelu_tanh", ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "FastGELUActivation")),
              ("gelu", ("GELUActivation", "GELU")), ("relu", ("ReLU",)), ("silu", ("SiLU", "SiLUActivation")),
              ("tanh", ("Tanh",)), ("identity", ("LinearActivation", "Identity"))]
    name = type(module).__name__
    for ours, classes in checks:
        if name in classes:
            return ours
    if isinstance(module, getattr(hf, "GELUActivation", ())):
        return "gelu"
    raise TypeError(f"the dense MLP uses activation {name}, which treeffn has no name for")


def dense_of(family: Family, layer: nn.Module) -> nn.Module:
    """The layer's stock MLP as a DenseFFN / GatedDenseFFN that shares its parameters."""
    if family.name == "opt":
        return DenseFFN.from_linears(layer.fc1, layer.fc2, activation_name(layer.activation_fn), layer.activation_fn)
    mlp = layer.mlp
    if family.name == "gpt2":
        if type(mlp).__name__ != "GPT2MLP":
            raise TypeError(f"GPT2Block.mlp is a {type(mlp).__name__}; treeffn swaps GPT2MLP only")
        return DenseFFN.from_linears(mlp.c_fc, mlp.c_proj, activation_name(mlp.act), mlp.act)
    if type(mlp).__name__ != "LlamaMLP":
        raise TypeError(f"LlamaDecoderLayer.mlp is a {type(mlp).__name__}; treeffn swaps LlamaMLP only")
    return GatedDenseFFN.from_linears(mlp.gate_proj, mlp.up_proj, mlp.down_proj, activation_name(mlp.act_fn),
                                      mlp.act_fn)


def install(family: Family, layer: nn.Module, ffn: nn.Module) -> None:
    """Put ``ffn`` where the layer's MLP was (see the module docstring for each family)."""
    if family.name == "opt":
        layer.fc1, layer.activation_fn, layer.fc2 = ffn, nn.Identity(), nn.Identity()
    elif family.name == "gpt2":
        layer.mlp.c_fc, layer.mlp.act, layer.mlp.c_proj = ffn, nn.Identity(), nn.Identity()
    else:
        layer.mlp = ffn


# ------------------------------------------------------------------------------ configs from presets
def hf_config_kwargs(model_cfg: dict, vocab_size: int, pad_id: int, bos_id: int, eos_id: int) -> dict:
    """Keyword arguments of the family's Hugging Face config for a preset (random init, no download)."""
    family = model_cfg.get("family", "opt")
    act = model_cfg["activation"]
    common = dict(vocab_size=vocab_size, pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id)
    if family == "opt":
        return dict(common, hidden_size=model_cfg["hidden_size"], ffn_dim=model_cfg["ffn_dim"],
                    num_hidden_layers=model_cfg["num_hidden_layers"],
                    num_attention_heads=model_cfg["num_attention_heads"],
                    max_position_embeddings=model_cfg["max_position_embeddings"],
                    word_embed_proj_dim=model_cfg.get("word_embed_proj_dim") or model_cfg["hidden_size"],
                    do_layer_norm_before=model_cfg.get("do_layer_norm_before", True),
                    dropout=model_cfg["dropout"], attention_dropout=0.0, activation_function=act)
    if family == "gpt2":
        return dict(common, n_embd=model_cfg["hidden_size"], n_inner=model_cfg["ffn_dim"],
                    n_layer=model_cfg["num_hidden_layers"], n_head=model_cfg["num_attention_heads"],
                    n_positions=model_cfg["max_position_embeddings"], activation_function=HF_ACTIVATION[act],
                    resid_pdrop=model_cfg["dropout"], embd_pdrop=model_cfg["dropout"],
                    attn_pdrop=model_cfg["dropout"])
    if family == "llama":
        return dict(common, hidden_size=model_cfg["hidden_size"], intermediate_size=model_cfg["ffn_dim"],
                    num_hidden_layers=model_cfg["num_hidden_layers"],
                    num_attention_heads=model_cfg["num_attention_heads"],
                    num_key_value_heads=model_cfg.get("num_key_value_heads") or model_cfg["num_attention_heads"],
                    max_position_embeddings=model_cfg["max_position_embeddings"],
                    rms_norm_eps=model_cfg.get("rms_norm_eps", 1e-5),
                    rope_parameters={"rope_type": "default", "rope_theta": float(model_cfg.get("rope_theta", 10000.0))},
                    tie_word_embeddings=model_cfg.get("tie_word_embeddings", True),
                    attention_dropout=model_cfg["dropout"], hidden_act=HF_ACTIVATION[act])
    raise ValueError(f"model.family={family!r} is not supported; choose one of: {', '.join(FAMILIES)}")


def config_widths(config) -> dict:
    """hidden_size / ffn_dim / num_hidden_layers of a Hugging Face config of any supported family."""
    ffn = getattr(config, "ffn_dim", None) or getattr(config, "intermediate_size", None) \
        or getattr(config, "n_inner", None) or 4 * config.hidden_size
    return {"hidden_size": config.hidden_size, "ffn_dim": ffn, "num_hidden_layers": config.num_hidden_layers}


def init_std_of(config) -> float:
    return getattr(config, "init_std", None) or getattr(config, "initializer_range", None) or 0.02
