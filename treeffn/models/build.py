"""Model presets (conf/model/*.yaml) to Hugging Face models with dense or tree feed-forward blocks.

Two regimes:

* from scratch (``model.init_from: null``): the family's config from the preset, random init;
* fine-tune (``model.init_from=<dir>``): a dense OPT / GPT-2 / Llama checkpoint written by
  ``save_pretrained``; attention, embeddings and norms are kept bit for bit and the MLPs are
  replaced by tree layers initialised at random (``tree.init=random``) or from the dense
  weights (``tree.init=from_dense``, treeffn/models/from_dense.py). ``model.freeze`` can fix
  the reused parts.

Tree models are built as the registered tree classes (treeffn/models/hf.py), so
``save_hf`` writes a dir that ``AutoModelForCausalLM.from_pretrained`` reloads.

Every weight is initialised once, by the law it would have had anyway (the family's
``_init_weights``, the tree layers' ``reset_parameters``), or not at all where it is copied from
the checkpoint: treeffn/models/weight_init.py says how.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from treeffn.config import ConfigError
from treeffn.layers import DENSE_LAYER_TYPES, TREE_LAYER_TYPES, LeafFFN, PrunedLeafFFN, PrunedTreeFFN, TreeFFN
from treeffn.layers.dense_ffn import dense_units
from treeffn.models.families import FAMILIES, config_widths, hf_config_kwargs, init_std_of
from treeffn.models.swap import ffn_modules, model_family, swap_mlp, tree_layers
from treeffn.models.tree_settings import TreeSpec, make_tree_layer
from treeffn.models.weight_init import from_config_once, init_tree_layer, new_stock_model, no_weight_init


def opt_config(model_cfg: dict, vocab_size: int, pad_id: int, bos_id: int, eos_id: int):
    """The stock OPT config of an OPT preset (kept for callers that build OPT by hand)."""
    from transformers import OPTConfig

    return OPTConfig(**hf_config_kwargs({**model_cfg, "family": "opt"}, vocab_size, pad_id, bos_id, eos_id))


def make_tree_ffn(model_cfg: dict, tree_cfg: dict, init_std: float = 0.02) -> nn.Module:
    """One tree layer as configured (node or leaf family; gated when the model family is)."""
    family = FAMILIES[model_cfg.get("family", "opt")]
    return make_tree_layer(TreeSpec.from_config(model_cfg, tree_cfg, family.gated), model_cfg["hidden_size"], init_std)


def build_model(model_cfg: dict, tree_cfg: dict, vocab_size: int, pad_id: int, bos_id: int, eos_id: int,
                pretrained: bool = True):
    """The causal LM a run trains: its MLPs swapped for the configured FFN.

    With ``model.init_from`` the architecture and (if ``pretrained``) the weights come from that
    dense checkpoint; ``pretrained=False`` builds the same shapes without reading weights (for
    loading a run's own checkpoint over it).
    """
    family_name = model_cfg.get("family", "opt")
    if family_name not in FAMILIES:
        raise ConfigError(f"model.family={family_name!r} is not supported; choose one of: {', '.join(FAMILIES)}")
    family = FAMILIES[family_name]
    tree = tree_cfg["ffn"] == "tree"
    if model_cfg.get("init_from"):
        model = _from_checkpoint(model_cfg, tree_cfg, vocab_size, pretrained)
    elif tree:
        from treeffn.models.hf import tree_config, TREE_CLASSES

        spec = TreeSpec.from_config(model_cfg, tree_cfg, family.gated)
        config = tree_config(family_name, hf_config_kwargs(model_cfg, vocab_size, pad_id, bos_id, eos_id), spec)
        model = TREE_CLASSES[family_name][2](config)
    else:
        config = family.load("config_class")(**hf_config_kwargs(model_cfg, vocab_size, pad_id, bos_id, eos_id))
        # Initialised before the swap: GPT-2's law finds its scaled c_proj weights by module.
        model = new_stock_model(family.load("lm_class"), config)
        # Same computation as the stock model; the wrapper only gives every FFN one module.
        swap_mlp(model, lambda dense: dense)
    freeze(model, model_cfg.get("freeze") or "none")
    return model


def _from_checkpoint(model_cfg: dict, tree_cfg: dict, vocab_size: int, pretrained: bool):
    """Fine-tune start: the dense checkpoint with its MLPs replaced (see the module docstring)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = str(model_cfg["init_from"])
    dense_config = AutoConfig.from_pretrained(path)
    family_name = dense_config.model_type
    if family_name not in FAMILIES:  # config.py checks this first; this guards direct callers
        raise ConfigError(f"model.init_from={path} holds a {family_name!r} model; treeffn fine-tunes dense "
                          f"checkpoints of: {', '.join(FAMILIES)}")
    if vocab_size > dense_config.vocab_size:
        raise ConfigError(f"the tokenizer has {vocab_size} tokens but the checkpoint in {path} embeds only "
                          f"{dense_config.vocab_size}; use the checkpoint's tokenizer (data.tokenizer={path})")
    widths = config_widths(dense_config)
    if widths["hidden_size"] != model_cfg["hidden_size"]:
        raise ConfigError(f"model.hidden_size={model_cfg['hidden_size']} does not match the checkpoint in {path} "
                          f"(hidden size {widths['hidden_size']})")
    family = FAMILIES[family_name]
    tree = tree_cfg["ffn"] == "tree"
    if tree:
        # Checkpoint widths are the truth for the tree's parameter matching too.
        spec = TreeSpec.from_config({**model_cfg, "ffn_dim": widths["ffn_dim"]}, tree_cfg, family.gated)
        from treeffn.models.hf import TREE_CLASSES

        tree_cls_config, tree_cls = TREE_CLASSES[family_name][1], TREE_CLASSES[family_name][2]
        config = tree_cls_config.from_dict({**dense_config.to_dict(), "model_type": tree_cls_config.model_type,
                                            "tree": spec.to_dict()})
    if not pretrained:
        # Shapes only (a run's own checkpoint is loaded over every weight): the checkpoint's
        # architecture at random, each weight initialised once, no dense model to copy from.
        if not tree:
            return swap_mlp(from_config_once(dense_config), lambda d: d)
        return tree_cls(config)
    from treeffn.models.hf import no_weight_bars

    with no_weight_bars():
        dense = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    if not tree:
        swap_mlp(dense, lambda d: d)
        return dense
    # Built without any init: the non-MLP weights are copied from the checkpoint below, and the
    # tree layers get their one init (random or from_dense) after that.
    with no_weight_init():
        model = tree_cls(config)
    model.tie_weights()  # post_init ties; under no_weight_init it did not
    dense_state = dense.state_dict()
    tree_state = model.state_dict()
    # Everything but the MLPs: keys the two models share, same shapes; copied exactly.
    shared = {k: v for k, v in dense_state.items() if k in tree_state and tree_state[k].shape == v.shape}
    result = model.load_state_dict(shared, strict=False)
    not_ffn = [k for k in result.missing_keys if not _is_ffn_key(model, k)]
    if not_ffn:
        raise ConfigError(f"model.init_from={path}: the checkpoint lacks {len(not_ffn)} non-MLP weights "
                          f"(e.g. {not_ffn[0]}); is it a {family_name} model of this shape?")
    if tree_cfg.get("init", "random") == "from_dense":
        from treeffn.models.from_dense import init_from_dense

        # init_from_dense writes every parameter of the layer (tests/test_model_build.py checks it).
        for tree_layer, dense_ffn in zip(ffn_modules(model), _dense_mlps(dense)):
            init_from_dense(tree_layer, dense_ffn)
    else:
        std = init_std_of(config)
        for tree_layer in ffn_modules(model):
            init_tree_layer(tree_layer, std)
    return model


def _dense_mlps(model: nn.Module) -> list[nn.Module]:
    from treeffn.models.families import dense_of, find_decoder_layers

    family, layers = find_decoder_layers(model)
    return [dense_of(family, layer) for layer in layers]


def _is_ffn_key(model: nn.Module, key: str) -> bool:
    """True for parameters and buffers that belong to a swapped-in FFN."""
    prefixes = {name for name, m in model.named_modules() if isinstance(m, (*TREE_LAYER_TYPES, *DENSE_LAYER_TYPES))}
    return any(key.startswith(p + ".") for p in prefixes)


def freeze(model: nn.Module, what: str) -> None:
    """model.freeze: ``attention`` fixes every attention block; ``all_but_ffn`` fixes everything
    except the FFN layers (embeddings, norms, attention, head). Frozen parameters get no gradient,
    so the optimizer (built from parameters that require grad) never changes them."""
    if what in (None, "none"):
        return
    family = model_family(model)
    if what == "attention":
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] == family.attention:
                module.requires_grad_(False)
        return
    if what == "all_but_ffn":
        model.requires_grad_(False)
        for m in ffn_modules(model):
            m.requires_grad_(True)
        return
    raise ConfigError(f"model.freeze={what!r} is not allowed; choose one of: none, attention, all_but_ffn")


# ------------------------------------------------------------------------------ accounting
@dataclass
class Accounting:
    params_total: int
    params_ffn: int
    ffn_units: int          # per layer: dense ffn_dim; node tree trees*nodes; leaf routers + leaf units
    active_ffn_units: int   # units a token uses per layer (inference path)
    active_ffn_fraction: float
    # Forward FLOPs per token in all FFN layers together (a multiply-add = 2 FLOPs; routing
    # comparisons and element-wise work left out). "train" is the training path (masked /
    # soft mixture: every node or leaf computed), "infer" the inference path (only the path).
    ffn_flops_per_token_train: int = 0
    ffn_flops_per_token_infer: int = 0
    dense_ffn_flops_per_token: int = 0      # the dense MLP of the same model width and ffn_dim
    ffn_trainable_params: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def ffn_cost(module: nn.Module) -> tuple[int, int, int, int]:
    """(units, active units, train-path FLOPs/token, inference-path FLOPs/token) of one FFN layer."""
    if isinstance(module, DENSE_LAYER_TYPES):
        f, d = dense_units(module)["in"].shape
        vectors = 3 if module.gated else 2
        return f, f, 2 * vectors * d * f, 2 * vectors * d * f
    if isinstance(module, LeafFFN):  # includes PrunedLeafFFN
        d, k, w = module.d_model, module.trees, module.leaf_width
        vectors = 3 if module.gated else 2
        leaf_units = module.total_units - k * module.routers
        train = 2 * d * k * module.routers + 2 * vectors * d * leaf_units
        infer = 2 * d * k * module.depth + 2 * vectors * d * k * w
        if isinstance(module, PrunedLeafFFN):
            train = infer  # it always routes hard
        return module.total_units, module.active_units, train, infer
    if isinstance(module, (TreeFFN, PrunedTreeFFN)):
        d = module.d_model
        vectors = 3 if getattr(module, "gated", False) else 2
        total = module.kept if isinstance(module, PrunedTreeFFN) else module.total_nodes
        infer = 2 * vectors * d * module.active_nodes
        train = infer if isinstance(module, PrunedTreeFFN) else 2 * vectors * d * total
        return total, module.active_nodes, train, infer
    raise TypeError(f"no cost model for {type(module).__name__}")


def accounting(model: nn.Module) -> Accounting:
    ffns = ffn_modules(model)
    params_ffn = sum(p.numel() for m in ffns for p in m.parameters())
    params_total = sum(p.numel() for p in model.parameters())
    costs = [ffn_cost(m) for m in ffns]
    units, active = costs[0][0], costs[0][1]
    widths = config_widths(model.config)
    gated = model_family(model).gated
    dense_flops = len(ffns) * 2 * (3 if gated else 2) * widths["hidden_size"] * widths["ffn_dim"]
    return Accounting(
        params_total=params_total, params_ffn=params_ffn, ffn_units=units, active_ffn_units=active,
        active_ffn_fraction=active / units,
        ffn_flops_per_token_train=sum(c[2] for c in costs), ffn_flops_per_token_infer=sum(c[3] for c in costs),
        dense_ffn_flops_per_token=dense_flops,
        ffn_trainable_params=sum(p.numel() for m in ffns for p in m.parameters() if p.requires_grad),
    )


__all__ = ["Accounting", "accounting", "build_model", "ffn_cost", "freeze", "make_tree_ffn", "opt_config",
           "tree_layers"]
