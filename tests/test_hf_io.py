"""Save/load as Hugging Face model dirs: exact logits after from_pretrained in a fresh process."""

import json
import subprocess
import sys

import pytest
import torch

from treeffn.data.tokenizer import load_tokenizer
from treeffn.models.build import build_model
from treeffn.models.hf import as_tree_model, is_tree_model, load_hf, save_hf
from treeffn.models.swap import swap_mlp

BASE = {"hidden_size": 32, "ffn_dim": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64, "word_embed_proj_dim": 32,
        "do_layer_norm_before": True, "dropout": 0.0}
TREE = {"ffn": "tree", "family": "node", "depth": 3, "trees": None, "placement": "node", "activation": "gelu",
        "bias": True, "impl": "auto", "leaf_width": None, "hardening_weight": 0.0, "init": "random"}
CASES = {
    "opt_node": ({**BASE, "family": "opt", "activation": "gelu"}, TREE),
    "opt_dense": ({**BASE, "family": "opt", "activation": "gelu"}, {"ffn": "dense"}),
    "gpt2_leaf": ({**BASE, "family": "gpt2", "activation": "gelu_tanh"}, {**TREE, "family": "leaf", "depth": 2}),
    "llama_post_sum": ({**BASE, "family": "llama", "activation": "silu"},
                       {**TREE, "placement": "post_sum", "activation": "silu"}),
}

# Runs in a new interpreter: only `import treeffn`, then the plain transformers API.
FRESH = """
import json, sys
import treeffn
assert "torch" not in sys.modules, "import treeffn must not import torch"
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out = {}
for name in sys.argv[2:]:
    folder = sys.argv[1] + "/" + name
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = torch.load(folder + "/ids.pt")
    with torch.no_grad():
        same = torch.equal(model(ids).logits, torch.load(folder + "/logits.pt"))
    prompt = tok("To be, or not to be", return_tensors="pt").input_ids
    text = model.generate(prompt, max_new_tokens=6, do_sample=False)
    out[name] = {"class": type(model).__name__, "same": same, "generated": int(text.shape[1] - prompt.shape[1])}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tok = load_tokenizer("embedded")
    root = tmp_path_factory.mktemp("hf")
    ids = torch.randint(0, len(tok), (2, 16), generator=torch.Generator().manual_seed(0))
    for name, (model_cfg, tree_cfg) in CASES.items():
        torch.manual_seed(0)
        model = build_model(model_cfg, tree_cfg, len(tok), tok.pad_token_id, tok.bos_token_id,
                            tok.eos_token_id).eval()
        save_hf(model, tok, root / name)
        with torch.no_grad():
            torch.save(model(ids).logits, root / name / "logits.pt")
        torch.save(ids, root / name / "ids.pt")
    return root


@pytest.mark.slow
def test_from_pretrained_in_a_fresh_process_gives_the_same_logits_and_generates(saved):
    proc = subprocess.run([sys.executable, "-c", FRESH, str(saved), *CASES], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["opt_node"]["class"] == "TreeOPTForCausalLM"
    assert out["gpt2_leaf"]["class"] == "TreeGPT2LMHeadModel"
    assert out["llama_post_sum"]["class"] == "TreeLlamaForCausalLM"
    assert out["opt_dense"]["class"] == "OPTForCausalLM"  # dense runs save as the stock family
    for name, row in out.items():
        assert row["same"], name
        assert row["generated"] == 6, name


def test_saved_dirs_hold_config_safetensors_and_tokenizer(saved):
    for name in CASES:
        files = {p.name for p in (saved / name).iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= files, name
        assert not any(f.endswith(".bin") for f in files)
    tree_cfg = json.loads((saved / "opt_node" / "config.json").read_text())
    assert tree_cfg["model_type"] == "treeffn_opt" and tree_cfg["architectures"] == ["TreeOPTForCausalLM"]
    assert tree_cfg["tree"]["depth"] == 3 and tree_cfg["tree"]["trees"] == 6
    dense_cfg = json.loads((saved / "opt_dense" / "config.json").read_text())
    assert dense_cfg["model_type"] == "opt"
    from safetensors import safe_open

    with safe_open(str(saved / "opt_dense" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.decoder.layers.0.fc1.weight" in keys and "model.decoder.layers.0.fc2.bias" in keys
    assert not any(".fc1.fc1." in k for k in keys)


def test_load_hf_in_process_round_trips_exactly(saved):
    model, tok = load_hf(saved / "gpt2_leaf")
    ids = torch.load(saved / "gpt2_leaf" / "ids.pt")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, torch.load(saved / "gpt2_leaf" / "logits.pt"))
    assert len(tok) == len(load_tokenizer("embedded"))


def test_a_hand_swapped_stock_model_saves_as_the_tree_class(tmp_path):
    from transformers import OPTForCausalLM

    from treeffn.layers import TreeFFN
    from treeffn.models.build import opt_config

    torch.manual_seed(0)
    stock = OPTForCausalLM(opt_config({**BASE, "activation": "gelu"}, 100, 1, 0, 0))
    swap_mlp(stock, lambda dense: TreeFFN(32, depth=2, trees=3))
    stock.eval()
    assert not is_tree_model(stock) and is_tree_model(as_tree_model(stock))
    ids = torch.randint(0, 100, (1, 10))
    with torch.no_grad():
        before = stock(ids).logits
    save_hf(stock, None, tmp_path / "m")
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)


STORED_TREE = {"family": "node", "depth": 3, "trees": 6, "placement": "node", "activation": "gelu", "bias": True,
               "gated": False, "impl": "auto", "track_stats": True, "leaf_width": None, "hardening_weight": 0.0,
               "pruned_kept": None}


def test_the_saved_tree_entry_keeps_its_format(saved):
    assert json.loads((saved / "opt_node" / "config.json").read_text())["tree"] == STORED_TREE


def test_tree_spec_round_trips_what_config_json_stores():
    from treeffn.models.tree_settings import TreeSpec

    pruned = {**STORED_TREE, "pruned_kept": [5, 7]}
    spec = TreeSpec.from_dict(pruned)
    assert spec.pruned_kept == (5, 7) and hash(spec)  # frozen
    assert spec.to_dict() == pruned
    # an entry written before some keys existed loads with their defaults
    older = {k: v for k, v in STORED_TREE.items() if k not in ("gated", "track_stats", "pruned_kept")}
    assert TreeSpec.from_dict(older).to_dict() == STORED_TREE
    with pytest.raises(ValueError, match="fanout"):
        TreeSpec.from_dict({**STORED_TREE, "fanout": 3})
