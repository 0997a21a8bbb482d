"""Training batches skip transformers' mask check (treeffn/models/unpadded.py) and compute the same
loss and gradients as the model called the plain way, in every model family."""

import pytest
import torch
from transformers import masking_utils

from tests.test_training import make_cfg
from treeffn.models.build import build_model
from treeffn.models.unpadded import unpadded_blocks
from treeffn.training.lm_module import CausalLMModule


def counting_mask_checks(monkeypatch) -> list:
    """Calls of the helper that reads the padding mask on the host to choose SDPA's causal path."""
    calls = []
    original = masking_utils._ignore_causal_mask_sdpa

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(masking_utils, "_ignore_causal_mask_sdpa", counted)
    return calls


@pytest.mark.parametrize("model", ["tiny", "gpt2_tiny", "llama_tiny"])
@pytest.mark.parametrize("ffn", ["tree", "dense"])
def test_training_forward_skips_the_mask_check_with_the_same_numbers(cache_dir, monkeypatch, model, ffn):
    cfg = make_cfg(cache_dir, f"model={model}", f"tree={ffn}")
    torch.manual_seed(0)
    net = build_model(cfg["model"], cfg["tree"], vocab_size=500, pad_id=1, bos_id=2, eos_id=2).double().train()
    for m in net.modules():  # dropout off: the two calls must see the same function
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    net.config.dropout = net.config.attention_dropout = 0.0
    assert net.config._attn_implementation == "sdpa"
    module = CausalLMModule(net, cfg["optim"], max_steps=10)
    ids = torch.randint(3, 500, (3, 32))
    calls = counting_mask_checks(monkeypatch)

    plain = net(input_ids=ids, labels=ids).loss
    plain_grads = torch.autograd.grad(plain, [p for p in net.parameters() if p.requires_grad], allow_unused=True)
    checks_plain = len(calls)

    fast = module(ids).loss
    fast_grads = torch.autograd.grad(fast, [p for p in net.parameters() if p.requires_grad], allow_unused=True)

    assert checks_plain > 0, "the plain call should go through transformers' mask check"
    assert len(calls) == checks_plain, "the training forward must not check the mask"
    assert net.config._attn_implementation == "sdpa"  # restored for export, evaluation, generation
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-12)
    for a, b in zip(fast_grads, plain_grads):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_padded_inputs_outside_the_block_still_get_their_mask(cache_dir):
    """Left padding changes the logits of the padded row only while the mask is built: the
    plain call after a training forward still honours it."""
    cfg = make_cfg(cache_dir, "model=tiny", "tree=dense")
    torch.manual_seed(0)
    net = build_model(cfg["model"], cfg["tree"], vocab_size=500, pad_id=1, bos_id=2, eos_id=2).double().eval()
    ids = torch.randint(3, 500, (2, 16))
    with unpadded_blocks(net):
        net(input_ids=ids)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    masked = net(input_ids=ids, attention_mask=mask).logits
    unmasked = net(input_ids=ids).logits
    torch.testing.assert_close(masked[1], unmasked[1], rtol=0, atol=1e-10)
    assert not torch.allclose(masked[0, 5:], unmasked[0, 5:])


def test_other_attention_implementations_are_left_alone(cache_dir):
    cfg = make_cfg(cache_dir, "model=tiny", "tree=dense")
    net = build_model(cfg["model"], cfg["tree"], vocab_size=500, pad_id=1, bos_id=2, eos_id=2)
    net.config._attn_implementation = "eager"
    with unpadded_blocks(net):
        assert net.config._attn_implementation == "eager"
    assert net.config._attn_implementation == "eager"
