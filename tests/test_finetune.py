"""Fine-tune regime: dense checkpoint -> tree model, exact reuse of attention, from_dense grouping, errors."""

import copy
import math
import json

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from tests.conftest import TINY
from treeffn.config import ConfigError, validate_train_config
from treeffn.data.tokenizer import load_tokenizer
from treeffn.layers import GatedTreeFFN, LeafFFN, TreeFFN
from treeffn.layers.dense_ffn import dense_units
from treeffn.models.build import build_model
from treeffn.models.families import dense_of, find_decoder_layers
from treeffn.models.from_dense import importance
from treeffn.models.hf import save_hf
from treeffn.models.swap import ffn_modules

BASE = {"hidden_size": 32, "ffn_dim": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64, "word_embed_proj_dim": 32,
        "do_layer_norm_before": True, "dropout": 0.0, "init_from": None, "freeze": "none"}
TREE = {"ffn": "tree", "family": "node", "depth": 3, "trees": None, "placement": "node", "activation": "gelu",
        "bias": True, "impl": "auto", "leaf_width": None, "hardening_weight": 0.0, "init": "random"}
FAMILY_ACT = {"opt": "gelu", "gpt2": "gelu_tanh", "llama": "silu"}


@pytest.fixture(scope="module")
def dense_dirs(tmp_path_factory):
    """A small dense model of each family saved with save_pretrained (via save_hf)."""
    tok = load_tokenizer("embedded")
    root = tmp_path_factory.mktemp("dense")
    for family, act in FAMILY_ACT.items():
        torch.manual_seed(0)
        model = build_model({**BASE, "family": family, "activation": act}, {"ffn": "dense"}, len(tok),
                            tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
        save_hf(model, tok, root / family)
    return root


def load_dense(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path))


def non_ffn_state(model):
    names = {n for n, m in model.named_modules() if m in ffn_modules(model)}
    return {k: v for k, v in model.state_dict().items() if not any(k.startswith(n + ".") for n in names)}


@pytest.mark.parametrize("family", list(FAMILY_ACT))
@pytest.mark.parametrize("tree", [{**TREE}, {**TREE, "init": "from_dense"},
                                  {**TREE, "family": "leaf", "depth": 2, "init": "from_dense"}],
                         ids=["node-random", "node-from_dense", "leaf-from_dense"])
def test_reused_weights_are_bit_identical_to_the_dense_checkpoint(dense_dirs, family, tree):
    model_cfg = {**BASE, "family": family, "activation": FAMILY_ACT[family], "init_from": str(dense_dirs / family)}
    model = build_model(model_cfg, {**tree, "activation": FAMILY_ACT[family]}, 8000, 0, 0, 0)
    dense = load_dense(dense_dirs / family)
    reused = non_ffn_state(model)
    dense_state = dense.state_dict()
    attention = [k for k in reused if "attn." in k]
    assert attention and len(reused) > len(attention)  # attention, embeddings, norms, head
    for key, value in reused.items():
        assert torch.equal(value, dense_state[key]), key
    ids = torch.randint(0, 8000, (2, 12))
    assert torch.isfinite(model(ids, labels=ids).loss)


@pytest.mark.parametrize("family", list(FAMILY_ACT))
def test_from_dense_copies_whole_units_grouped_by_sign_split(dense_dirs, family):
    model_cfg = {**BASE, "family": family, "activation": FAMILY_ACT[family], "init_from": str(dense_dirs / family)}
    model = build_model(model_cfg, {**TREE, "init": "from_dense"}, 8000, 0, 0, 0)
    dense = load_dense(dense_dirs / family)
    fam, layers = find_decoder_layers(dense)
    units = dense_units(dense_of(fam, layers[0]))
    tree = ffn_modules(model)[0]
    assert isinstance(tree, GatedTreeFFN if family == "llama" else TreeFFN)
    # Every node is one dense unit, copied exactly; no unit is used twice.
    match = (tree.w_in.unsqueeze(1) == units["in"].unsqueeze(0)).all(-1)
    assert bool((match.sum(1) == 1).all())
    unit_of_node = match.float().argmax(1)
    assert len(set(unit_of_node.tolist())) == tree.total_nodes
    assert torch.equal(tree.w_out, units["out"][unit_of_node])
    if family == "llama":
        assert torch.equal(tree.w_up, units["up"][unit_of_node])
    # The units kept are the most important ones; each tree's root is its group's strongest unit.
    score = importance(units)
    kept = set(torch.argsort(score, descending=True)[:tree.total_nodes].tolist())
    assert set(unit_of_node.tolist()) == kept
    per_tree = unit_of_node.view(tree.trees, tree.nodes)
    for k in range(tree.trees):
        assert score[per_tree[k, 0]] == score[per_tree[k]].max()
        # Sign split: the right child subtree's units point more like the root's row than the left's.
        root = units["in"][per_tree[k, 0]]
        cos = torch.nn.functional.cosine_similarity(units["in"][per_tree[k]], root.unsqueeze(0))
        left, right = [1, 3, 4, 7, 8, 9, 10], [2, 5, 6, 11, 12, 13, 14]
        assert cos[right].min() >= cos[left].max()


def test_leaf_from_dense_keeps_the_dense_output_bias(dense_dirs):
    model_cfg = {**BASE, "family": "opt", "activation": "gelu", "init_from": str(dense_dirs / "opt")}
    model = build_model(model_cfg, {**TREE, "family": "leaf", "depth": 2, "trees": 2, "init": "from_dense"},
                        8000, 0, 0, 0)
    leaf = ffn_modules(model)[0]
    assert isinstance(leaf, LeafFFN) and leaf.leaf_width == 12
    dense = load_dense(dense_dirs / "opt")
    bias = dense.model.decoder.layers[0].fc2.bias
    torch.testing.assert_close(leaf.leaf_out_b.sum(0) / leaf.leaves, bias)


def test_freeze_attention_keeps_it_fixed_through_an_optimizer_step(dense_dirs):
    from treeffn.training.lm_module import parameter_groups

    model_cfg = {**BASE, "family": "gpt2", "activation": "gelu_tanh", "init_from": str(dense_dirs / "gpt2"),
                 "freeze": "attention"}
    model = build_model(model_cfg, {**TREE, "init": "from_dense"}, 8000, 0, 0, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-2)
    ids = torch.randint(0, 8000, (2, 12))
    model(ids, labels=ids).loss.backward()
    opt.step()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if ".attn." in k)
    assert not torch.equal(before["transformer.h.0.mlp.c_fc.w_in"], after["transformer.h.0.mlp.c_fc.w_in"])
    assert not torch.equal(before["transformer.wte.weight"], after["transformer.wte.weight"])
    everything = build_model({**model_cfg, "freeze": "all_but_ffn"}, TREE, 8000, 0, 0, 0)
    trainable = {n for n, p in everything.named_parameters() if p.requires_grad}
    assert trainable and all(".mlp.c_fc." in n for n in trainable)


# ------------------------------------------------------------------------------ bad input
def compose_cfg(cache_dir, *overrides):
    with initialize_config_module("treeffn.conf", version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, f"data.cache_dir={cache_dir}", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def test_bad_fine_tune_input_fails_with_one_line(tmp_path, cache_dir, dense_dirs):
    base = compose_cfg(cache_dir)

    def error(model=None, tree=None):
        cfg = copy.deepcopy(base)
        cfg["model"].update(model or {})
        cfg["tree"].update(tree or {})
        with pytest.raises(ConfigError) as err:
            validate_train_config(cfg)
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "no such directory" in error({"init_from": str(tmp_path / "nope")})
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert "holds a 'bert' model; treeffn fine-tunes dense checkpoints of: opt, gpt2, llama" in \
        error({"init_from": str(tmp_path / "bert")})
    (tmp_path / "empty").mkdir()
    assert "is not a Hugging Face model dir: it has no config.json" in error({"init_from": str(tmp_path / "empty")})
    assert "tree.init=from_dense needs model.init_from" in error(tree={"init": "from_dense"})
    msg = error({"init_from": str(dense_dirs / "opt"), "hidden_size": 64})
    assert msg.startswith("model.hidden_size=64 does not match the checkpoint") and "hidden_size=32" in msg
    assert "is a gpt2 checkpoint but model.family=opt" in error({"init_from": str(dense_dirs / "gpt2")})
    assert "model.freeze=attention needs model.init_from" in error({"freeze": "attention"})
    assert "model.freeze='everything'" in error({"freeze": "everything"})
    assert "tree.init='pretrained'" in error(tree={"init": "pretrained"})
    matched = {"init_from": str(dense_dirs / "opt"), "ffn_dim": 96, "num_hidden_layers": 2, "num_attention_heads": 4}
    assert "needs at most model.ffn_dim=96 tree units" in error(matched, {"init": "from_dense", "trees": 7,
                                                                         "depth": 3})
    # The tokenizer must fit the checkpoint's embedding.
    with pytest.raises(ConfigError, match="the tokenizer has 9000 tokens but the checkpoint .* embeds only"):
        build_model({**BASE, "family": "opt", "activation": "gelu", "init_from": str(dense_dirs / "opt")}, TREE,
                    9000, 0, 0, 0)


# ------------------------------------------------------------------------------ the whole chain
@pytest.mark.slow
def test_dense_run_then_tree_fine_tunes_with_each_init(tmp_path, cache_dir):
    from treeffn.training.train import train

    dense_run = tmp_path / "dense"
    fast = ("trainer.limit_val_batches=1", "logger=none")
    train(compose_cfg(cache_dir, "tree=dense", "trainer.max_steps=4", *fast), dense_run)
    hf_dir = dense_run / "hf"
    if not (hf_dir / "config.json").exists():  # train() writes it once the run-dir export lands
        from treeffn.models.load import load_from_run

        loaded = load_from_run(dense_run)
        save_hf(loaded.model, loaded.tokenizer, hf_dir)
    dense = load_dense(hf_dir)
    for init in ("random", "from_dense"):
        run = tmp_path / init
        result = train(compose_cfg(cache_dir, f"model.init_from={hf_dir}", f"tree.init={init}", "tree.depth=2",
                                   "model.freeze=attention", "trainer.max_steps=2", *fast), run)
        assert result["steps"] == 2 and result["val_loss"] < 10 and result["ffn"] == "tree"
        state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        for key, value in dense.state_dict().items():
            if ".self_attn." in key:  # frozen during fine-tuning: still the dense run's weights
                assert torch.equal(state["model." + key], value), key


@pytest.mark.slow
def test_val_at_start_measures_the_model_at_the_moment_of_conversion(tmp_path, cache_dir):
    """trainer.val_at_start=auto validates a model.init_from run before its first step: a dense
    continuation starts at exactly the pretrained run's final validation, a tree conversion above
    it; the number is logged at step 0, kept in the checkpoint (a resume keeps it) and recorded."""
    import csv

    from treeffn.training.train import train

    fast = ("trainer.limit_val_batches=2", "logger=csv")
    pretrained = train(compose_cfg(cache_dir, "tree=dense", "trainer.max_steps=4", *fast), tmp_path / "pretrain")
    assert pretrained["val_at_start"] is None  # auto: a run from scratch has nothing converted
    hf_dir = tmp_path / "pretrain" / "hf"
    starts = {}
    for name, overrides in {"dense": ["tree=dense"], "from_dense": ["tree.init=from_dense", "tree.depth=2"],
                            "random": ["tree.depth=2"]}.items():
        run = tmp_path / name
        result = train(compose_cfg(cache_dir, f"model.init_from={hf_dir}", "trainer.max_steps=2", *fast,
                                   *overrides), run)
        start = result["val_at_start"]
        assert start["step"] == 0 and start["val_ppl"] == pytest.approx(math.exp(start["val_loss"]))
        rows = list(csv.DictReader(open(run / "logs" / "csv" / "metrics.csv")))
        at_zero = [float(r["val/loss"]) for r in rows if r.get("val/loss") and int(r["step"]) == 0]
        assert at_zero == [pytest.approx(start["val_loss"], rel=1e-6)]
        kept = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["treeffn"]["val_at_start"]
        assert kept == start
        starts[name] = start["val_loss"]
    # The same weights on the same validation blocks (fp32 safetensors, CPU): the same loss.
    assert starts["dense"] == pytest.approx(pretrained["val_loss"], rel=1e-6)
    assert starts["from_dense"] > starts["dense"] and starts["random"] > starts["dense"]
    off = train(compose_cfg(cache_dir, f"model.init_from={hf_dir}", "tree=dense", "trainer.max_steps=1",
                            "trainer.val_at_start=false", *fast), tmp_path / "off")
    assert off["val_at_start"] is None
