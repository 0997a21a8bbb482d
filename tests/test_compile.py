"""trainer.compile: decoder layers compile without graph breaks, and a compiled run trains the
same numbers as the eager one."""

import pytest
import torch

from tests.test_training import make_cfg, read_metrics
from treeffn.models.build import build_model
from treeffn.models.families import find_decoder_layers


def first_layer_call(model, ids):
    """(args, kwargs) the model passes to its first decoder layer."""
    _, layers = find_decoder_layers(model)
    seen = {}

    def keep(module, args, kwargs):
        seen["call"] = (args, kwargs)

    handle = layers[0].register_forward_pre_hook(keep, with_kwargs=True)
    model(input_ids=ids, labels=ids)
    handle.remove()
    return layers[0], seen["call"]


@pytest.mark.parametrize("model", ["tiny", "gpt2_tiny", "llama_tiny"])
@pytest.mark.parametrize("ffn", ["tree", "dense"])
def test_decoder_layers_trace_as_one_graph(cache_dir, model, ffn):
    """The masked tree path (routing, mask, statistics included) has no graph break in any family."""
    cfg = make_cfg(cache_dir, f"model={model}", f"tree={ffn}")
    net = build_model(cfg["model"], cfg["tree"], vocab_size=500, pad_id=1, bos_id=2, eos_id=2).train()
    torch.manual_seed(0)
    layer, (args, kwargs) = first_layer_call(net, torch.randint(3, 500, (2, 24)))
    explained = torch._dynamo.explain(layer)(*args, **kwargs)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.slow
def test_a_compiled_run_trains_the_same_losses(tmp_path, cache_dir):
    from treeffn.training.train import train

    common = ["tree.depth=3", "trainer.max_steps=12", "trainer.log_every_n_steps=4", "trainer.val_check_interval=12"]
    eager = train(make_cfg(cache_dir, *common), tmp_path / "eager")
    compiled = train(make_cfg(cache_dir, *common, "trainer.compile=true"), tmp_path / "compiled")
    losses = [[float(r["train/loss"]) for r in read_metrics(tmp_path / run) if r.get("train/loss")]
              for run in ("eager", "compiled")]
    assert len(losses[0]) == 3
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-4)
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-4)
    assert compiled["routing"]["mean"]["dead_frac"] == pytest.approx(eager["routing"]["mean"]["dead_frac"])


@pytest.mark.slow
def test_bf16_mixed_training_clips_with_the_fused_optimizer(tmp_path, cache_dir):
    """The GPUs' precision (bf16-mixed) goes through Lightning's mixed-precision plugin, which
    refuses to clip gradients for a fused optimizer; the module clips itself. On CPU too."""
    from treeffn.training.train import train

    result = train(make_cfg(cache_dir, "tree.depth=2", "trainer.precision=bf16-mixed", "trainer.max_steps=6",
                            "trainer.log_every_n_steps=3", "optim.grad_clip=0.5"), tmp_path / "run")
    assert result["status"] == "finished" and result["precision"] == "bf16-mixed"
    losses = [float(r["train/loss"]) for r in read_metrics(tmp_path / "run") if r.get("train/loss")]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
