"""Subtree pruning: exact logits on the counting text, smaller models that save and reload, the CLI."""

import json

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from tests.conftest import TINY
from treeffn.analysis.pruning import path_walk, prune_and_measure
from treeffn.data.tokenizer import load_tokenizer
from treeffn.layers import PrunedLeafFFN, PrunedTreeFFN, TreeFFN
from treeffn.layers.pruned import _close_under_parents
from treeffn.models.build import accounting, build_model
from treeffn.models.hf import save_hf
from treeffn.models.swap import ffn_modules, tree_layers

BASE = {"hidden_size": 32, "ffn_dim": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64, "word_embed_proj_dim": 32,
        "do_layer_norm_before": True, "dropout": 0.0}
TREE = {"ffn": "tree", "family": "node", "depth": 4, "trees": 2, "placement": "node", "activation": "gelu",
        "bias": True, "impl": "auto", "leaf_width": None, "hardening_weight": 0.0, "init": "random"}
CASES = {
    "opt-node": ({**BASE, "family": "opt", "activation": "gelu"}, TREE),
    "opt-post_sum": ({**BASE, "family": "opt", "activation": "gelu"}, {**TREE, "placement": "post_sum"}),
    "llama-gated": ({**BASE, "family": "llama", "activation": "silu"}, {**TREE, "activation": "silu"}),
    "gpt2-leaf": ({**BASE, "family": "gpt2", "activation": "gelu_tanh"},
                  {**TREE, "family": "leaf", "depth": 3, "leaf_width": 4}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pruned_hard_eval_logits_equal_the_unpruned_ones_on_the_counting_text(case, tmp_path):
    model_cfg, tree_cfg = CASES[case]
    torch.manual_seed(0)
    model = build_model(model_cfg, tree_cfg, 100, 1, 0, 0).eval()
    blocks = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), path_walk(model):  # the walk the pruned layers do (auto may take masked)
        before = model(blocks).logits
    pruned, report = prune_and_measure(model, blocks, batch_size=1)
    with torch.no_grad():
        after = pruned(blocks).logits
    assert torch.equal(after, before)
    assert report.ppl_change == 0.0 and report.loss_before == report.loss_after
    assert report.params_after < report.params_before
    assert report.params_before - report.params_after == report.ffn_params_before - report.ffn_params_after
    layers = ffn_modules(pruned)
    assert all(isinstance(m, (PrunedTreeFFN, PrunedLeafFFN)) for m in layers)
    assert all(layer["kept"] < layer["total"] for layer in report.layers)
    acct = accounting(pruned)
    assert acct.params_total == report.params_after
    assert acct.ffn_flops_per_token_train == acct.ffn_flops_per_token_infer
    # The pruned model is a saveable tree model: it reloads with the same logits.
    save_hf(pruned, None, tmp_path / "pruned")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert reloaded.config.tree["pruned_kept"] == [layer["kept"] for layer in report.layers]
    with torch.no_grad():
        assert torch.equal(reloaded(blocks).logits, before)
    # Other text may step into removed subtrees: those nodes add nothing, the output stays finite.
    other = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.isfinite(reloaded(other).logits).all()


def test_pruned_layers_keep_routing_statistics_in_the_heap_layout():
    torch.manual_seed(0)
    model = build_model(*CASES["opt-node"], 100, 1, 0, 0).eval()
    blocks = torch.randint(0, 100, (1, 5))
    pruned, _ = prune_and_measure(model, blocks, batch_size=1)
    layer = tree_layers(pruned)[0]
    assert isinstance(layer, PrunedTreeFFN) and layer.node_visits.numel() == 2 * 31
    original = tree_layers(model)[0].node_visits.clone()
    layer.node_visits.zero_()
    with torch.no_grad():
        pruned(blocks)
    assert torch.equal(layer.node_visits, original)


def test_a_dropped_node_takes_its_whole_subtree():
    keep = torch.ones(1, 7, dtype=torch.bool)
    keep[0, 1] = False  # left child of the root: its children 3 and 4 must go too
    assert _close_under_parents(keep).tolist() == [[True, False, True, False, False, True, True]]


def test_min_visits_prunes_rarely_used_nodes_too():
    torch.manual_seed(0)
    model = build_model(*CASES["opt-node"], 100, 1, 0, 0).eval()
    blocks = torch.randint(0, 100, (4, 16))
    exact, _ = prune_and_measure(model, blocks, batch_size=2)
    lossy, report = prune_and_measure(model, blocks, batch_size=2, min_visits=3)
    assert report.params_after < sum(p.numel() for p in exact.parameters())
    assert report.min_visits == 3


# ------------------------------------------------------------------------------ the command
@pytest.fixture
def run_dir(tmp_path, cache_dir):
    """A run dir the way train() leaves it: config.yaml plus the hf/ export."""
    with initialize_config_module("treeffn.conf", version_base="1.3"):
        cfg = OmegaConf.to_container(compose("config", overrides=[*TINY, f"data.cache_dir={cache_dir}",
                                                                  "tree.depth=4"]), resolve=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    tok = load_tokenizer("embedded")
    torch.manual_seed(0)
    model = build_model(cfg["model"], cfg["tree"], len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    save_hf(model.eval(), tok, run / "hf")
    return run


@pytest.mark.slow
def test_prune_command_reports_and_saves_a_smaller_model(run_dir, capsys):
    from treeffn.cli.prune import main

    assert main([f"run={run_dir}", "max_blocks=2", "batch_size=2"]) == 0
    out = capsys.readouterr().out
    assert "parameters:" in out and "change +0.000000" in out and f"pruned model: {run_dir / 'pruned'}" in out
    report = json.loads((run_dir / "pruned" / "prune.json").read_text())
    assert report["ppl_change"] == 0.0 and report["params_after"] < report["params_before"]
    assert report["count_tokens"] == 2 * 32 and report["tokens"] == 2 * 31
    assert (run_dir / "pruned" / "model.safetensors").exists() and (run_dir / "pruned" / "tokenizer.json").exists()


def test_prune_command_bad_input_is_one_line(tmp_path, capsys):
    from treeffn.cli.prune import main

    assert main([f"run={tmp_path / 'missing'}"]) == 2
    assert capsys.readouterr().err.strip() == f"treeffn prune: error: run={tmp_path / 'missing'}: no such run dir"
    assert main(["depth=3"]) == 2
    assert "depth is not a key of treeffn prune" in capsys.readouterr().err
    assert main(["min_visit=3"]) == 2
    assert "did you mean min_visits?" in capsys.readouterr().err
    assert main(["out=x"]) == 2
    assert capsys.readouterr().err.strip() == ("treeffn prune: error: run is required: give run=... "
                                               "(`treeffn prune --help` lists the keys)")
    assert main(["run=x", "min_visits=two"]) == 2
    assert "min_visits='two' is not allowed" in capsys.readouterr().err


def test_pruning_a_dense_model_is_refused():
    from treeffn.config import ConfigError

    model = build_model(CASES["opt-node"][0], {"ffn": "dense"}, 100, 1, 0, 0)
    with pytest.raises(ConfigError, match="dense FFNs: there are no trees to prune"):
        prune_and_measure(model, torch.randint(0, 100, (1, 8)), 1)
    assert not isinstance(ffn_modules(model)[0], TreeFFN)
