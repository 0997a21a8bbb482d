"""GPT-2 and Llama swaps: exact dense equivalence, gated trees, presets that train, clear failures."""

import copy

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from tests.conftest import TINY
from treeffn.config import ConfigError, validate_train_config
from treeffn.layers import DenseFFN, GatedDenseFFN, GatedTreeFFN, LeafFFN, TreeFFN
from treeffn.models.build import accounting, build_model
from treeffn.models.families import FAMILIES, hf_config_kwargs
from treeffn.models.swap import ffn_modules, swap_mlp

BASE = {"hidden_size": 32, "ffn_dim": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64, "word_embed_proj_dim": 32,
        "do_layer_norm_before": True, "dropout": 0.0}
GPT2 = {**BASE, "family": "gpt2", "activation": "gelu_tanh"}
LLAMA = {**BASE, "family": "llama", "activation": "silu"}
TREE = {"ffn": "tree", "family": "node", "depth": 3, "trees": None, "placement": "node", "activation": "silu",
        "bias": True, "impl": "auto", "leaf_width": None, "hardening_weight": 0.0, "init": "random"}


def stock_model(model_cfg):
    family = FAMILIES[model_cfg["family"]]
    config = family.load("config_class")(**hf_config_kwargs(model_cfg, 100, 1, 0, 0))
    return family.load("lm_class")(config).eval()


@pytest.mark.parametrize("model_cfg", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_dense_swap_reproduces_the_stock_logits(model_cfg):
    torch.manual_seed(0)
    model = stock_model(model_cfg)
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        before = model(ids).logits.clone()
    keys_before = set(model.state_dict())
    swap_mlp(model, lambda dense: dense)
    expected = GatedDenseFFN if model_cfg["family"] == "llama" else DenseFFN
    assert all(isinstance(m, expected) for m in ffn_modules(model)) and len(ffn_modules(model)) == 2
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    if model_cfg["family"] == "llama":  # same child names: a swapped dense Llama keeps stock keys
        assert set(model.state_dict()) == keys_before


@pytest.mark.parametrize("model_cfg, layer_type", [(GPT2, TreeFFN), (LLAMA, GatedTreeFFN)], ids=["gpt2", "llama"])
def test_tree_swap_trains_and_eval_path_matches_train_path(model_cfg, layer_type):
    torch.manual_seed(0)
    model = build_model(model_cfg, TREE, 100, 1, 0, 0)
    layers = ffn_modules(model)
    assert len(layers) == 2 and all(type(m) is layer_type for m in layers)
    ids = torch.randint(0, 100, (2, 12))
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert layers[0].w_in.grad is not None and layers[0].w_in.grad.abs().sum() > 0
    with torch.no_grad():
        train_logits = model(ids).logits
        model.eval()
        eval_logits = model(ids).logits
    torch.testing.assert_close(eval_logits, train_logits, rtol=1e-5, atol=1e-5)


def test_gated_tree_accounting_counts_three_vectors_per_node():
    model = build_model(LLAMA, TREE, 100, 1, 0, 0)
    acct = accounting(model)
    nodes = (96 // 15) * 15
    assert acct.ffn_units == nodes and acct.active_ffn_units == (96 // 15) * 4
    assert acct.params_ffn == 2 * nodes * (3 * 32 + 1)
    # FLOPs: gate, up and down GEMMs over all nodes (train) or the path (infer), vs the dense MLP.
    assert acct.ffn_flops_per_token_train == 2 * 2 * 3 * 32 * nodes
    assert acct.ffn_flops_per_token_infer == 2 * 2 * 3 * 32 * acct.active_ffn_units
    assert acct.dense_ffn_flops_per_token == 2 * 2 * 3 * 32 * 96
    leaf = accounting(build_model(LLAMA, {**TREE, "family": "leaf", "depth": 2}, 100, 1, 0, 0))
    assert isinstance(ffn_modules(build_model(LLAMA, {**TREE, "family": "leaf", "depth": 2}, 100, 1, 0, 0))[0],
                      LeafFFN)
    # one tree, 3 routers, 4 leaves of 24 units: train computes everything, infer 2 routers + 1 leaf
    assert leaf.ffn_flops_per_token_train == 2 * (2 * 32 * 3 + 2 * 3 * 32 * 96)
    assert leaf.ffn_flops_per_token_infer == 2 * (2 * 32 * 2 + 2 * 3 * 32 * 24)


def test_an_unknown_decoder_layer_class_fails_clearly():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32))
    with pytest.raises(TypeError, match="GPTNeoXForCausalLM has no decoder layer treeffn knows how to swap; "
                                        "supported: OPTDecoderLayer, GPT2Block, LlamaDecoderLayer"):
        swap_mlp(model, lambda d: d)


def test_an_unexpected_mlp_class_inside_a_known_layer_fails_clearly():
    model = stock_model(GPT2)
    model.transformer.h[0].mlp = torch.nn.Sequential(torch.nn.Linear(32, 32))
    with pytest.raises(TypeError, match="GPT2Block.mlp is a Sequential; treeffn swaps GPT2MLP only"):
        swap_mlp(model, lambda d: d)


def compose_cfg(cache_dir, *overrides):
    with initialize_config_module("treeffn.conf", version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, f"data.cache_dir={cache_dir}", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def test_presets_compose_and_validate(cache_dir):
    for preset, family in (("gpt2_tiny", "gpt2"), ("llama_tiny", "llama"), ("gpt2_124m", "gpt2"), ("llama_1b", "llama")):
        with initialize_config_module("treeffn.conf", version_base="1.3"):
            cfg = OmegaConf.to_container(compose("config", overrides=[f"model={preset}"]), resolve=True)
        validate_train_config(cfg)
        assert cfg["model"]["family"] == family and cfg["tree"]["activation"] == cfg["model"]["activation"]
    cfg = compose_cfg(cache_dir, "model=llama_tiny")
    bad = copy.deepcopy(cfg)
    bad["model"]["num_key_value_heads"] = 3
    with pytest.raises(ConfigError, match="model.num_key_value_heads=3 must divide model.num_attention_heads=2"):
        validate_train_config(bad)
    bad = copy.deepcopy(cfg)
    bad["tree"].update(family="leaf", placement="post_sum")
    with pytest.raises(ConfigError, match="tree.placement='post_sum' applies to tree.family=node only"):
        validate_train_config(bad)
    bad = copy.deepcopy(cfg)
    bad["tree"]["hardening_weight"] = -1
    with pytest.raises(ConfigError, match="tree.hardening_weight=-1"):
        validate_train_config(bad)


def test_published_shapes_have_the_published_parameter_counts():
    """GPT-2 124M with its 50257-token vocab; Llama 1B widths (built on the meta device: no memory)."""
    def count(preset, vocab):
        cfg = OmegaConf.to_container(OmegaConf.load(f"conf/model/{preset}.yaml"))
        with torch.device("meta"):
            model = build_model(cfg, {"ffn": "dense"}, vocab, 0, 0, 0)
        return sum(p.numel() for p in model.parameters())

    assert count("gpt2_124m", 50257) == 124_439_808
    assert round(count("llama_1b", 128256) / 1e9, 2) == 1.24


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [("model=gpt2_tiny", "tree=dense"), ("model=gpt2_tiny", "tree.depth=2"),
                                       ("model=llama_tiny", "tree=dense"), ("model=llama_tiny", "tree.depth=2"),
                                       ("model=llama_tiny", "tree.family=leaf", "tree.depth=2")],
                         ids=["gpt2-dense", "gpt2-tree", "llama-dense", "llama-tree", "llama-leaf"])
def test_presets_train_on_the_embedded_default(tmp_path, cache_dir, overrides):
    from treeffn.training.train import train

    result = train(compose_cfg(cache_dir, *overrides, "trainer.max_steps=3", "trainer.limit_val_batches=1",
                               "logger=none"), tmp_path / "run")
    assert result["steps"] == 3 and result["val_loss"] < 10
    assert result["ffn_flops_per_token_infer"] <= result["ffn_flops_per_token_train"]
    if "tree=dense" in overrides:
        assert result["ffn_flops_per_token_infer"] == result["dense_ffn_flops_per_token"]
    else:
        assert result["ffn_flops_per_token_infer"] < result["dense_ffn_flops_per_token"]


def test_opt_presets_are_opt_as_published_with_gelu_trees():
    """OPT's dense MLP uses ReLU; the tree layer keeps GELU by default (the paper's derivation
    is about GELU), and tree.activation still overrides it."""
    for preset in ("opt125m", "opt350m", "opt1.3b", "opt2.7b"):
        for extra, tree_act in (([], "gelu"), (["tree.activation=relu"], "relu")):
            with initialize_config_module("treeffn.conf", version_base="1.3"):
                cfg = OmegaConf.to_container(compose("config", overrides=[f"model={preset}", *extra]), resolve=True)
            validate_train_config(cfg)
            assert cfg["model"]["activation"] == "relu" and cfg["tree"]["activation"] == tree_act
