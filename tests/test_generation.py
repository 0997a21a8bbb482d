"""treeffn's decode loop (treeffn/generation) on the CPU: same tokens as Hugging Face generate(),
no host synchronisation inside a decode step, sampling, errors, and `treeffn generate` itself.

The CUDA-graph capture itself needs a GPU (scripts/h200_decode.py checks it there); what a capture
needs from a step is checked here: ``HostSyncGuard`` fails on anything that waits for the device.
"""

import json

import pytest
import torch

from tests.conftest import run_cli
from treeffn.generation import DecodeLoop, Sampling, generate
from treeffn.generation.capture import CaptureUnsafe, HostSyncGuard
from treeffn.generation.parity import FAMILY_PRESETS
from treeffn.models.build import build_model

VOCAB = 211
# The families of treeffn.generation.parity, at a smaller width.
FAMILIES = {name: {**cfg, "hidden_size": 32, "ffn_dim": 128, "word_embed_proj_dim": 32}
            for name, cfg in FAMILY_PRESETS.items()}


def tree_cfg(ffn="tree", family="node", placement="node", activation="gelu", depth=2):
    return {"ffn": ffn, "family": family, "depth": depth, "trees": None, "placement": placement,
            "activation": activation, "bias": True, "impl": "auto", "track_stats": True, "leaf_width": None,
            "hardening_weight": 0.0, "init": "random"}


def make_model(family: str, ffn="tree", tree_family="node", placement="node", **model_overrides):
    model_cfg = {**FAMILIES[family], **model_overrides}
    torch.manual_seed(0)
    model = build_model(model_cfg, tree_cfg(ffn, tree_family, placement, model_cfg["activation"]),
                        vocab_size=VOCAB, pad_id=1, bos_id=0, eos_id=2)
    with torch.no_grad():  # routing follows the signs of the node biases too: give them a spread
        for name, p in model.named_parameters():
            if name.endswith("b_in") or name.endswith("router_b"):
                p.normal_(0, 0.5)
    return model.eval()


def hf_greedy(model, prompt, new, eos=None):
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                         do_sample=False, eos_token_id=eos, pad_token_id=1)
    return out[:, prompt.shape[1]:]


VARIANTS = [
    ("opt", "dense", "node", "node"), ("opt", "tree", "node", "node"), ("opt", "tree", "node", "post_sum"),
    ("opt", "tree", "leaf", "node"), ("gpt2", "dense", "node", "node"), ("gpt2", "tree", "node", "post_sum"),
    ("gpt2", "tree", "leaf", "node"), ("llama", "dense", "node", "node"), ("llama", "tree", "node", "node"),
    ("llama", "tree", "node", "post_sum"), ("llama", "tree", "leaf", "node"),
]


@pytest.mark.parametrize("family, ffn, tree_family, placement", VARIANTS)
def test_greedy_tokens_match_hf_generate(family, ffn, tree_family, placement):
    """Every family, dense and tree (node, post_sum, leaf; Llama's trees are gated): same tokens."""
    model = make_model(family, ffn, tree_family, placement)
    prompt = torch.randint(3, VOCAB, (3, 5), generator=torch.Generator().manual_seed(1))
    ours = generate(model, prompt, 12)
    assert torch.equal(ours.tokens, hf_greedy(model, prompt, 12))
    assert ours.decode_steps == 11 and ours.mode == "eager"


@pytest.mark.parametrize("overrides", [{"do_layer_norm_before": False}, {"word_embed_proj_dim": 16}])
def test_opt_variants_match_hf(overrides):
    """OPT-350M's post-norm layout and the project_in/out of a narrower embedding."""
    model = make_model("opt", "tree", **overrides)
    prompt = torch.randint(3, VOCAB, (2, 4), generator=torch.Generator().manual_seed(2))
    assert torch.equal(generate(model, prompt, 10).tokens, hf_greedy(model, prompt, 10))


def test_pruned_tree_model_matches_hf():
    from treeffn.analysis.pruning import prune_model

    model = make_model("opt", "tree")
    prompt = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(prompt)  # count visits, so that pruning removes something
    pruned, _ = prune_model(model)
    pruned.eval()
    assert torch.equal(generate(pruned, prompt, 8).tokens, hf_greedy(pruned, prompt, 8))


def test_end_of_text_stops_like_hf():
    """Sequences that emit end-of-text get pads afterwards; the output stops when all have ended."""
    model = make_model("opt", "tree")
    prompt = torch.randint(3, VOCAB, (3, 5), generator=torch.Generator().manual_seed(1))
    free = hf_greedy(model, prompt, 12)
    eos = int(free[0, 3])  # a token the first sequence emits: it ends there
    ref = hf_greedy(model, prompt, 12, eos=eos)
    loop = DecodeLoop(model, 3, 17, eos_id=eos, pad_id=1)
    for check_every in (1, 4, 16):
        ours = loop.run(prompt, 12, check_every=check_every)
        assert torch.equal(ours.tokens, ref), check_every


def test_loop_reuse_and_visit_counts_untouched():
    """A DecodeLoop runs many generations from one set of buffers; generate() leaves routing
    statistics alone."""
    model = make_model("opt", "tree")
    layers = [m for m in model.modules() if hasattr(m, "node_visits")]
    before = [m.node_visits.clone() for m in layers]
    prompt = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    first = generate(model, prompt, 8).tokens
    assert all(torch.equal(a, m.node_visits) for a, m in zip(before, layers))
    assert all(m.track_stats for m in layers)  # restored
    loop = DecodeLoop(model, 2, 20)
    other = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    loop.run(other, 10)
    assert torch.equal(loop.run(prompt, 8).tokens, first)


@pytest.mark.parametrize("family, ffn, tree_family", [
    ("opt", "dense", "node"), ("opt", "tree", "node"), ("gpt2", "tree", "leaf"), ("llama", "tree", "node"),
    ("llama", "dense", "node")])
def test_decode_step_never_waits_for_the_device(family, ffn, tree_family):
    """The greedy step (forward, argmax, end-of-text bookkeeping) and the sampling forward run
    no operator that synchronises on CUDA: they can be captured in a CUDA graph."""
    model = make_model(family, ffn, tree_family)
    loop = DecodeLoop(model, 2, 16, eos_id=2, pad_id=1)
    loop.run(torch.randint(3, VOCAB, (2, 4)), 3)
    with HostSyncGuard() as guard:
        loop.greedy_step()
        loop.forward_step()
    assert "aten::scaled_dot_product_attention" in guard.seen or any("attention" in s for s in guard.seen)


def test_guard_catches_what_a_capture_cannot_hold():
    x = torch.arange(6)
    for bad in (lambda: x.sum().item(), lambda: torch.bincount(x), lambda: x[x > 2], lambda: x.nonzero(),
                lambda: bool(x.any()), lambda: torch.unique(x)):
        with pytest.raises(CaptureUnsafe), HostSyncGuard():
            bad()
    with HostSyncGuard():  # sync-free equivalents pass
        torch.zeros(6, dtype=torch.long).index_add_(0, x, torch.ones_like(x))
        torch.where(x > 2, x, 0)


def test_routing_statistics_counting_is_capture_safe():
    """Tree layers that do count visits (track_stats) count without a host sync (index_add_)."""
    model = make_model("opt", "tree")
    loop = DecodeLoop(model, 1, 10)
    loop.run(torch.randint(3, VOCAB, (1, 3)), 2)
    with HostSyncGuard():
        loop.greedy_step()  # track_stats is on here: the loop was built outside generate()
    assert sum(int(m.node_visits.sum()) for m in model.modules() if hasattr(m, "node_visits")) > 0


def test_sampling_is_seeded_and_reduces_to_greedy():
    model = make_model("llama", "tree")
    prompt = torch.randint(3, VOCAB, (4, 5), generator=torch.Generator().manual_seed(6))
    s = Sampling(greedy=False, temperature=1.3, top_k=20, top_p=0.9, seed=7)
    a, b = generate(model, prompt, 10, s).tokens, generate(model, prompt, 10, s).tokens
    assert torch.equal(a, b)
    assert not torch.equal(a, generate(model, prompt, 10, Sampling(greedy=False, seed=8)).tokens)
    greedy = generate(model, prompt, 10).tokens
    assert torch.equal(generate(model, prompt, 10, Sampling(greedy=False, top_k=1, seed=9)).tokens, greedy)
    assert torch.equal(generate(model, prompt, 10, Sampling(greedy=False, top_p=1e-6, seed=9)).tokens, greedy)


def test_loop_refuses_what_it_cannot_do():
    model = make_model("opt", "dense")
    with pytest.raises(ValueError, match="CUDA"):
        DecodeLoop(model, 1, 8, graphs=True)
    loop = DecodeLoop(model, 2, 8)
    with pytest.raises(ValueError, match="exceed"):
        loop.run(torch.ones(2, 5, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="batch"):
        loop.run(torch.ones(3, 2, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="positions"):
        DecodeLoop(model, 1, 65)  # the model embeds 64 positions
    model.train()
    with pytest.raises(ValueError, match="eval"):
        DecodeLoop(model, 1, 8)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from treeffn.data.tokenizer import load_tokenizer
    from treeffn.models.hf import save_hf

    tok = load_tokenizer("embedded")
    model_cfg = {**FAMILIES["opt"], "max_position_embeddings": 256}
    torch.manual_seed(0)
    model = build_model(model_cfg, tree_cfg(), vocab_size=len(tok), pad_id=tok.pad_token_id,
                        bos_id=tok.bos_token_id, eos_id=tok.eos_token_id)
    return save_hf(model, tok, tmp_path_factory.mktemp("gen") / "hf")


@pytest.mark.slow
def test_cli_generate_prints_text_and_speed_and_writes_nothing(hf_dir, tmp_path):
    before = sorted(p.name for p in hf_dir.iterdir())
    proc = run_cli(["generate", f"model.path={hf_dir}", "prompt=\"To be, or not\"", "max_new_tokens=6",
                    "batch_size=2", "device=cpu"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "To be, or not" in proc.stdout and "tokens/s" in proc.stdout and "ms/step" in proc.stdout
    assert "TreeFFN x 2" in proc.stdout
    assert sorted(p.name for p in hf_dir.iterdir()) == before and not list(tmp_path.iterdir())
    out = tmp_path / "rec.json"
    proc = run_cli(["generate", f"model.path={hf_dir}", "greedy=false", "top_k=5", "max_new_tokens=4",
                    f"output={out}", "device=cpu"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    assert len(record["tokens"][0]) == 4 and record["timing"]["decode_steps"] == 3


@pytest.mark.parametrize("args, message", [
    (["max_new_tokens=0"], "max_new_tokens=0 is out of range"),
    (["compile=true", "device=cpu"], "needs a CUDA device"),
    (["top_p=0"], "top_p=0.0 must be in (0, 1]"),
    (["temperature=-1"], "temperature=-1.0 must be > 0"),
    (["dtype=int4"], "dtype='int4' is not allowed"),
    (["max_new_tokens=1000"], "exceed the model's 256 positions"),
])
def test_generate_settings_errors_are_one_line(hf_dir, args, message):
    from treeffn.config import ConfigError
    from treeffn.generation.runner import generate_from_config

    cfg = {"run": None, "ckpt": None, "model": {"path": str(hf_dir)}, "prompt": "Hi", "max_new_tokens": 4,
           "batch_size": 1, "compile": False, "greedy": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
           "seed": 0, "stop_at_eos": True, "warmup": False, "device": "cpu", "dtype": "auto", "output": None}
    for a in args:
        key, value = a.split("=")
        cfg[key] = {"true": True, "false": False}.get(value, int(value) if value.lstrip("-").isdigit() else
                                                      (float(value) if value.replace(".", "").isdigit() else value))
    with pytest.raises(ConfigError) as info:
        generate_from_config(cfg, out=lambda *_: None)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.slow
def test_cli_generate_bad_input_exits_2(tmp_path):
    for args, message in ((["run=/no/such/run"], "no such run dir"), (["prompt=a,b"], "quote the value"),
                          (["max_new_token=3"], "did you mean max_new_tokens")):
        proc = run_cli(["generate", *args], cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_bench_decode_mode_on_cpu(tmp_path):
    """`treeffn bench mode=decode` end to end at a toy size: both models, medians, ratios, JSON and Markdown."""
    from treeffn.cli.bench import main

    rc = main(["device=cpu", "mode=decode", "decode.model=tiny", "decode.layers=1", "decode.batches=[1,2]",
               "decode.prompt=3", "decode.new=4", "decode.rounds=2", "decode.depth=3", f"out={tmp_path}"])
    assert rc == 0
    result = json.loads((tmp_path / "decode.json").read_text())
    recs = result["decode"]
    assert {(r["model"], r["batch"], r["mode"]) for r in recs} == {
        (m, b, "eager") for m in ("dense", "tree") for b in (1, 2)}
    assert all(len(r["ms_per_step_rounds"]) == 2 and r["decode_tokens_per_s"] > 0 for r in recs)
    assert {(r["batch"], r["mode"]) for r in result["ratios"]} == {(1, "eager"), (2, "eager")}
    assert "| 1 | eager |" in (tmp_path / "decode.md").read_text()


def test_profile_of_one_decode_step():
    from treeffn.bench.decode import profile_step

    model = make_model("opt", "tree")
    loop = DecodeLoop(model, 2, 12)
    loop.run(torch.randint(3, VOCAB, (2, 4)), 3)
    prof = profile_step(loop, steps=2)
    assert prof["top"] and prof["device_us_per_step"] > 0
    assert any("linear" in r["name"] or "addmm" in r["name"] or "mm" in r["name"] for r in prof["top"])
