"""The MLP swap into Hugging Face OPT: exact dense equivalence, accounting, clear failures."""

import pytest
import torch
from omegaconf import OmegaConf

from treeffn.config import resolve_trees
from treeffn.layers import DenseFFN, TreeFFN
from treeffn.models.build import accounting, build_model, opt_config
from treeffn.models.swap import swap_mlp

MODEL = {"name": "t", "family": "opt", "hidden_size": 32, "ffn_dim": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "max_position_embeddings": 64, "word_embed_proj_dim": 32,
         "do_layer_norm_before": True, "dropout": 0.0, "activation": "gelu"}
TREE = {"ffn": "tree", "family": "node", "depth": 3, "trees": None, "placement": "node",
        "activation": "gelu", "bias": True, "impl": "auto"}


def test_dense_swap_reproduces_the_stock_model_logits():
    from transformers import OPTForCausalLM

    torch.manual_seed(0)
    stock = OPTForCausalLM(opt_config(MODEL, vocab_size=100, pad_id=1, bos_id=0, eos_id=0)).eval()
    ids = torch.randint(0, 100, (3, 20))
    with torch.no_grad():
        before = stock(ids).logits.clone()
    swap_mlp(stock, lambda dense: dense)
    assert all(isinstance(layer.fc1, DenseFFN) for layer in stock.model.decoder.layers)
    with torch.no_grad():
        after = stock(ids).logits
    assert torch.equal(before, after)


def test_tree_model_accounting_matches_the_layer_formula():
    model = build_model(MODEL, TREE, vocab_size=100, pad_id=1, bos_id=0, eos_id=0)
    trees = resolve_trees(MODEL, TREE)
    assert trees == 96 // 15 == 6
    acct = accounting(model)
    per_layer = trees * 15 * (2 * 32 + 1)
    assert acct.params_ffn == 2 * per_layer
    assert acct.ffn_units == 90 and acct.active_ffn_units == 24
    assert acct.active_ffn_fraction == pytest.approx(24 / 90)
    assert acct.params_total == sum(p.numel() for p in model.parameters())
    dense = accounting(build_model(MODEL, {"ffn": "dense"}, 100, 1, 0, 0))
    assert dense.params_ffn == 2 * (32 * 96 + 96 + 96 * 32 + 32)
    assert acct.params_total - acct.params_ffn == dense.params_total - dense.params_ffn


def test_opt125m_preset_is_parameter_matched_at_depth_6_and_7():
    model_cfg = OmegaConf.to_container(OmegaConf.load("conf/model/opt125m.yaml"))
    assert resolve_trees(model_cfg, {"depth": 6, "trees": None}) == 24
    assert resolve_trees(model_cfg, {"depth": 7, "trees": None}) == 12
    layer = TreeFFN(model_cfg["hidden_size"], 6, 24)
    assert layer.total_nodes == 3048 and round(100 * layer.active_fraction, 1) == 5.5


def test_tree_model_trains_a_step_and_routes_in_eval():
    torch.manual_seed(0)
    model = build_model(MODEL, {**TREE, "placement": "post_sum"}, 100, 1, 0, 0)
    ids = torch.randint(0, 100, (2, 16))
    loss = model(ids, labels=ids).loss
    loss.backward()
    layer = model.model.decoder.layers[0].fc1
    assert isinstance(layer, TreeFFN) and layer.w_in.grad is not None
    model.eval()
    with torch.no_grad():
        eval_logits = model(ids).logits
    model.train()
    with torch.no_grad():
        train_logits = model(ids).logits  # dropout is 0: both paths give the same function
    torch.testing.assert_close(eval_logits, train_logits, rtol=1e-5, atol=1e-5)


def test_swapping_an_unknown_model_fails_clearly():
    with pytest.raises(TypeError, match="no decoder layer treeffn knows"):
        swap_mlp(torch.nn.Sequential(torch.nn.Linear(4, 4)), lambda d: d)


def test_swapping_twice_fails_clearly():
    model = build_model(MODEL, TREE, 100, 1, 0, 0)
    with pytest.raises(ValueError, match="already swapped"):
        swap_mlp(model, lambda d: d)
