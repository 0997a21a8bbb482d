"""Model building initialises every weight once, by the law it had before (treeffn/models/weight_init.py).

Law: the family's ``_init_weights`` for the stock parts (normal(0, init_std) matrices and
embeddings, GPT-2's residual projections at init_std / sqrt(2 * layers), zero biases, unit norm
weights, zeroed padding rows, tied lm_head), the tree layers' ``reset_parameters`` (normal(0,
init_std) vectors, zero biases) and zeroed statistics buffers. Checked on the tiny presets for
every path through build_model and for from_pretrained of a saved tree dir.
"""

import collections
import contextlib
import math
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from treeffn.layers import LeafFFN, PrunedLeafFFN, TreeFFN
from treeffn.models.build import build_model
from treeffn.models.families import FAMILIES, hf_config_kwargs, init_std_of
from treeffn.models.hf import (
    TREE_CLASSES,
    install_tree_layers,
    save_hf,
    stock_state_dict,
    tree_config,
)
from treeffn.models.swap import ffn_modules
from treeffn.models.tree_settings import TreeSpec

VOCAB, PAD, BOS, EOS = 1000, 1, 0, 2
PRESETS = ["tiny", "gpt2_tiny", "llama_tiny"]
KINDS = ["dense", "node", "leaf"]
BIAS_NAMES = {"bias", "b_in", "router_b", "leaf_in_b", "leaf_out_b"}


def configs(preset: str, kind: str) -> tuple[dict, dict]:
    cfg = OmegaConf.create({"model": OmegaConf.load(f"conf/model/{preset}.yaml"),
                            "tree": OmegaConf.load("conf/tree/tree.yaml")})
    cfg = OmegaConf.to_container(cfg, resolve=True)
    if kind == "dense":
        return cfg["model"], {"ffn": "dense"}
    tree = {**cfg["tree"], "depth": 3}
    if kind == "leaf":
        tree.update(family="leaf", depth=2)
    return cfg["model"], tree


def build(preset: str, kind: str, seed: int = 0, **model_changes) -> nn.Module:
    model_cfg, tree_cfg = configs(preset, kind)
    torch.manual_seed(seed)
    return build_model({**model_cfg, **model_changes}, tree_cfg, vocab_size=VOCAB, pad_id=PAD, bos_id=BOS,
                       eos_id=EOS)


# ------------------------------------------------------------------------------ instruments
@contextlib.contextmanager
def counting_draws():
    """Counts random draws per storage: every init function ends in Tensor.normal_ / uniform_
    (nn.init.normal_, kaiming_uniform_, transformers' guarded copies). Drawn storages are kept
    alive so that a freed one's address is not reused by a later tensor. Meta tensors (the
    skeleton from_pretrained builds) hold no data and cost nothing: not counted."""
    counts, alive = collections.Counter(), []
    originals = {name: getattr(torch.Tensor, name) for name in ("normal_", "uniform_")}

    def counted(name):
        def draw(self, *args, **kwargs):
            if self.device.type != "meta":
                counts[self.untyped_storage().data_ptr()] += 1
                alive.append(self.untyped_storage())
            return originals[name](self, *args, **kwargs)
        return draw

    try:
        for name in originals:
            setattr(torch.Tensor, name, counted(name))
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


@pytest.fixture
def poisoned(monkeypatch):
    """Every init a constructor skips under no_weight_init writes NaN instead of nothing, so a
    parameter that nothing initialises afterwards shows up as non-finite."""
    import transformers.initialization as hf_init

    real = hf_init.no_init_weights

    def nan_fill(tensor, *args, **kwargs):
        with torch.no_grad():
            return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    @contextlib.contextmanager
    def no_init_writing_nan():
        with real():
            saved = []
            for module_name in hf_init.TORCH_MODULES_TO_PATCH:
                module = sys.modules.get(module_name)
                for fn in hf_init.TORCH_INIT_FUNCTIONS:
                    if module is not None and hasattr(module, fn):
                        saved.append((module, fn, getattr(module, fn)))
                        setattr(module, fn, nan_fill)
            try:
                yield
            finally:
                for module, fn, value in saved:
                    setattr(module, fn, value)

    monkeypatch.setattr(hf_init, "no_init_weights", no_init_writing_nan)


# ------------------------------------------------------------------------------ the law
def is_norm(module: nn.Module) -> bool:
    return "LayerNorm" in type(module).__name__ or "RMSNorm" in type(module).__name__


def expected(model: nn.Module, module_name: str, module: nn.Module, name: str) -> tuple[str, float]:
    """("const", value) or ("normal", std) for one parameter."""
    if is_norm(module):
        return "const", 1.0 if name == "weight" else 0.0
    if name in BIAS_NAMES:
        return "const", 0.0
    std = init_std_of(model.config)
    gpt2_residual = module_name.endswith(("attn.c_proj", "mlp.c_fc.fc2"))  # mlp.c_fc.fc2: the dense c_proj
    if model.config.model_type.endswith("gpt2") and gpt2_residual:
        return "normal", std / math.sqrt(2 * model.config.n_layer)
    return "normal", std


def assert_normal(t: torch.Tensor, std: float, what: str) -> None:
    x = t.detach().double().flatten()
    n = x.numel()
    assert abs(x.mean()) < 5 * std / math.sqrt(n), what
    assert abs(x.std() / std - 1) < 5 / math.sqrt(2 * n) + 0.01, (what, float(x.std()), std)
    if n >= 4096:  # normal, not uniform: 68.3% within one std (a uniform law has 57.7%)
        inside = float((x.abs() < std).double().mean())
        assert abs(inside - 0.6827) < 5 * math.sqrt(0.25 / n), (what, inside)


def check_law(model: nn.Module) -> int:
    """Asserts the law on every parameter and buffer; returns the number of normal-law tensors."""
    normal = 0
    seen = set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            what = f"{module_name}.{name}"
            assert torch.isfinite(p).all(), what
            if id(p) in seen:
                continue
            seen.add(id(p))
            kind, value = expected(model, module_name, module, name)
            if kind == "const":
                assert torch.equal(p, torch.full_like(p, value)), what
                continue
            normal += 1
            pad = getattr(module, "padding_idx", None)
            if isinstance(module, nn.Embedding) and pad is not None:
                assert torch.equal(p[pad], torch.zeros_like(p[pad])), what  # HF zeroes the padding row
                rows = torch.ones(p.shape[0], dtype=torch.bool)
                rows[pad] = False
                assert_normal(p[rows], value, what)
            else:
                assert_normal(p, value, what)
        for name, b in module.named_buffers(recurse=False):
            assert torch.isfinite(b.double()).all(), f"{module_name}.{name}"
            if isinstance(module, (TreeFFN, LeafFFN)):
                assert not b.any(), f"{module_name}.{name}"  # node_visits, level_logits start at zero
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return normal


def stock_reference(preset: str, kind: str, seed: int = 0) -> nn.Module:
    """The model as transformers builds it without treeffn's help (constructor init, then
    post_init), tree layers installed after: the old build path, the law to keep."""
    model_cfg, tree_cfg = configs(preset, kind)
    family = FAMILIES[model_cfg["family"]]
    kwargs = hf_config_kwargs(model_cfg, VOCAB, PAD, BOS, EOS)
    torch.manual_seed(seed)
    if kind == "dense":
        return family.load("lm_class")(family.load("config_class")(**kwargs))
    config = tree_config(family.name, kwargs, TreeSpec.from_config(model_cfg, tree_cfg, family.gated))
    model = family.load("lm_class")(config)
    install_tree_layers(model, config)
    return model


# ------------------------------------------------------------------------------ from scratch
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("preset", PRESETS)
def test_every_tensor_follows_the_init_law(preset, kind, poisoned):
    model = build(preset, kind)
    assert check_law(model) > 0
    if kind != "dense":
        assert all(isinstance(m, (TreeFFN, LeafFFN)) for m in ffn_modules(model))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("preset", PRESETS)
def test_the_law_is_the_one_the_stock_constructors_give(preset, kind):
    """Per tensor: the same constants exactly, the same spread (std within sampling error), the
    same buffers (rotary inv_freq included) as the double-initialised stock build."""
    model, ref = build(preset, kind), stock_reference(preset, kind)
    ours, theirs = stock_state_dict(model), ref.state_dict()  # stock_state_dict: the dense wrapper's keys undone
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        mine = ours[key]
        assert mine.shape == value.shape and mine.dtype == value.dtype, key
        if not value.is_floating_point() or value.numel() < 2 or bool((value == value.flatten()[0]).all()):
            assert torch.equal(mine, value), key
        else:
            ratio = float(mine.double().std() / value.double().std())
            assert abs(ratio - 1) < 7 / math.sqrt(value.numel()) + 0.01, (key, ratio)
    buffers, ref_buffers = dict(model.named_buffers()), dict(ref.named_buffers())
    assert buffers.keys() == ref_buffers.keys()
    for name, b in buffers.items():
        assert torch.equal(b, ref_buffers[name]), name


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("preset", PRESETS)
def test_same_seed_same_weights_other_seed_other_weights(preset, kind):
    a, b, c = build(preset, kind, seed=3).state_dict(), build(preset, kind, seed=3).state_dict(), \
        build(preset, kind, seed=4).state_dict()
    assert a.keys() == b.keys() == c.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    drawn = [k for k, v in a.items() if v.is_floating_point() and v.numel() > 1 and v.std() > 0]
    assert drawn and all(not torch.equal(a[k], c[k]) for k in drawn)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("preset", PRESETS)
def test_each_weight_is_drawn_once(preset, kind):
    """The stock constructors' init (kaiming_uniform_ of nn.Linear, normal_ of nn.Embedding, ...)
    does not run before post_init's; the stock MLPs a tree model replaces and a tied lm_head are
    not drawn at all. (The old build drew every Linear twice: this fails on it.)"""
    with counting_draws() as draws:
        model = build(preset, kind)
    params = {id(p): (n, p) for n, p in model.named_parameters(remove_duplicate=True)}
    expected_total = 0
    for name, p in params.values():
        module_name, _, short = name.rpartition(".")
        kind_, _ = expected(model, module_name, model.get_submodule(module_name), short)
        want = 0 if kind_ == "const" else 1
        # HF's own GPT-2 law draws its residual projections twice in one pass: normal(init_std) as
        # a Conv1D, then normal(init_std / sqrt(2 * layers)) from the attention / MLP module.
        if model.config.model_type.endswith("gpt2") and name.endswith(("attn.c_proj.weight", "mlp.c_fc.fc2.weight")):
            want = 2
        assert draws[p.untyped_storage().data_ptr()] == want, name
        expected_total += want
    assert sum(draws.values()) == expected_total  # nothing drawn on tensors the model does not keep


@pytest.mark.parametrize("kind", ["dense", "node"])
def test_an_untied_head_is_drawn_by_its_own_law(kind, poisoned):
    """Only a head that tie_weights replaces is skipped: an untied one is initialised like any Linear."""
    with counting_draws() as draws:
        model = build("llama_tiny", kind, tie_word_embeddings=False)
    head = model.get_output_embeddings().weight
    assert head is not model.get_input_embeddings().weight
    check_law(model)
    assert draws[head.untyped_storage().data_ptr()] == 1


def test_no_init_state_is_left_behind():
    model = build("llama_tiny", "node")
    assert not any(getattr(p, "_is_hf_initialized", False) for p in model.parameters())
    import torch.nn.init as torch_init
    from transformers.initialization import TORCH_INIT_FUNCTIONS
    from transformers.modeling_utils import PreTrainedModel

    assert torch_init.normal_ is TORCH_INIT_FUNCTIONS["normal_"]  # no_init_weights restored the functions
    assert PreTrainedModel.init_weights.__name__ == "init_weights"


# ------------------------------------------------------------------------------ fine-tune paths
@pytest.fixture(scope="module")
def dense_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense_ckpt")
    for preset in PRESETS:
        save_hf(build(preset, "dense", seed=11), None, root / preset)
    return root


def finetune(dense_dirs, preset: str, kind: str, init: str = "random", pretrained: bool = True, seed: int = 0):
    model_cfg, tree_cfg = configs(preset, kind)
    model_cfg = {**model_cfg, "init_from": str(dense_dirs / preset)}
    if kind != "dense":
        tree_cfg = {**tree_cfg, "init": init}
    torch.manual_seed(seed)
    return build_model(model_cfg, tree_cfg, vocab_size=VOCAB, pad_id=PAD, bos_id=BOS, eos_id=EOS,
                       pretrained=pretrained)


def ffn_prefixes(model):
    return tuple(n + "." for n, m in model.named_modules() if m in ffn_modules(model))


@pytest.mark.parametrize("kind,init", [("node", "random"), ("leaf", "random"), ("node", "from_dense"),
                                       ("leaf", "from_dense")])
@pytest.mark.parametrize("preset", PRESETS)
def test_fine_tune_start_copies_the_checkpoint_and_inits_only_the_trees(dense_dirs, preset, kind, init, poisoned):
    with counting_draws() as draws:
        model = finetune(dense_dirs, preset, kind, init)
    dense = build(preset, "dense", seed=11).state_dict()  # the checkpoint's weights
    prefixes = ffn_prefixes(model)
    for key, value in model.state_dict().items():
        if not key.startswith(prefixes):
            assert torch.equal(value, dense[key]), key
    for p in model.parameters():
        assert torch.isfinite(p).all()  # from_dense writes every tree parameter (NaN otherwise)
    trees = ffn_modules(model)
    for layer in trees:
        for b in layer.buffers():
            assert not b.any()
    tree_params = [p for layer in trees for n, p in layer.named_parameters() if n not in BIAS_NAMES]
    if init == "random":
        std = init_std_of(model.config)
        for layer in trees:
            for n, p in layer.named_parameters():
                if n in BIAS_NAMES:
                    assert not p.any(), n
                else:
                    assert_normal(p, std, n)
        assert all(draws[p.untyped_storage().data_ptr()] == 1 for p in tree_params)
        assert sum(draws.values()) == len(tree_params)  # only the tree layers are drawn
    else:
        assert sum(draws.values()) == 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("preset", PRESETS)
def test_shapes_only_fine_tune_build_is_initialised_once_and_deterministic(dense_dirs, preset, kind, poisoned):
    """pretrained=False (a run's own checkpoint is loaded over it): the checkpoint's architecture,
    at random by the law, without reading the dense weights."""
    with counting_draws() as draws:
        model = finetune(dense_dirs, preset, kind, pretrained=False)
    normal = check_law(model)
    # GPT-2's law draws its residual projections twice (see test_each_weight_is_drawn_once).
    twice = (2 if kind == "dense" else 1) * model.config.n_layer if preset == "gpt2_tiny" else 0
    assert sum(draws.values()) == normal + twice
    again = finetune(dense_dirs, preset, kind, pretrained=False)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------ from_pretrained
@pytest.mark.parametrize("kind", ["node", "leaf"])
@pytest.mark.parametrize("preset", PRESETS)
def test_from_pretrained_loads_every_weight_and_zeroes_level_logits(tmp_path, preset, kind):
    from transformers import AutoModelForCausalLM

    model = build(preset, kind).eval()
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        logits = model(ids).logits  # counts visits and level logits
    save_hf(model, None, tmp_path)
    with counting_draws() as draws:
        loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert sum(draws.values()) == 0  # everything is in the checkpoint
    assert type(loaded) is TREE_CLASSES[model.config.model_type.split("_")[-1]][2]
    saved = model.state_dict()
    assert loaded.state_dict().keys() == saved.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, saved[key]), key
    for name, b in loaded.named_buffers():
        if name.endswith("level_logits"):  # not saved: from_pretrained leaves torch.empty, we zero it
            assert not b.any(), name
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)


def test_from_pretrained_draws_a_tree_weight_the_checkpoint_lacks(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build("tiny", "node")
    save_hf(model, None, tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    key = next(k for k in weights if k.endswith("fc1.w_in"))
    del weights[key]
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    missing = loaded.get_parameter(key)
    assert_normal(missing, init_std_of(loaded.config), key)
    for name, value in loaded.state_dict().items():
        if name != key and not name.endswith("level_logits"):
            assert torch.equal(value, model.state_dict()[name]), name


def test_pruned_layers_are_left_to_their_loaders():
    """Pruned layers have no init law (they are built empty to load into): the tree init skips them."""
    from treeffn.models.weight_init import is_initialisable_tree_layer

    pruned = PrunedLeafFFN(8, 2, 4, 1, 2)
    assert not is_initialisable_tree_layer(pruned)
    assert is_initialisable_tree_layer(LeafFFN(8, 2, 4))
