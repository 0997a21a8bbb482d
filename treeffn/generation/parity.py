"""Checks of the decode loop against Hugging Face, for a device run (scripts/h200_decode.py).

``loop_parity`` builds small float64 models of every family (dense, node trees in both
placements, leaf trees; Llama's node trees are gated) on the device and compares

* the greedy tokens of the eager loop and of the CUDA-graphed loop with ``model.generate()``;
* the logits of the graphed forward step at the last position with the Hugging Face forward of
  the whole sequence (float64: relative difference below 1e-9);
* (any device) that the decode steps contain no operator that waits for the device
  (capture.HostSyncGuard).
"""

from __future__ import annotations

import torch

BASE = {"hidden_size": 64, "ffn_dim": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "max_position_embeddings": 64, "word_embed_proj_dim": 64, "do_layer_norm_before": True, "dropout": 0.0}
FAMILY_PRESETS = {
    "opt": {**BASE, "family": "opt", "activation": "gelu"},
    "gpt2": {**BASE, "family": "gpt2", "activation": "gelu_tanh"},
    "llama": {**BASE, "family": "llama", "activation": "silu", "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "tie_word_embeddings": True},
}
VARIANTS = (("dense", "node", "node"), ("tree", "node", "node"), ("tree", "node", "post_sum"), ("tree", "leaf", "node"))


def small_model(family: str, ffn: str, tree_family: str, placement: str, device, dtype=torch.float64,
                vocab: int = 97, depth: int = 2, trees: int | None = None, impl: str = "auto", seed: int = 0):
    from treeffn.models.build import build_model

    model_cfg = FAMILY_PRESETS[family]
    tree_cfg = {"ffn": ffn, "family": tree_family, "depth": depth, "trees": trees, "placement": placement,
                "activation": model_cfg["activation"], "bias": True, "impl": impl, "track_stats": False,
                "leaf_width": None, "hardening_weight": 0.0, "init": "random"}
    torch.manual_seed(seed)
    model = build_model(model_cfg, tree_cfg, vocab_size=vocab, pad_id=1, bos_id=0, eos_id=2)
    with torch.no_grad():  # spread the node biases: routing then depends on them too
        for name, p in model.named_parameters():
            if name.endswith("b_in") or name.endswith("router_b"):
                p.normal_(0, 0.5)
    return model.to(device=device, dtype=dtype).eval()


def loop_parity(device, families=("opt", "gpt2", "llama"), variants=VARIANTS, batch: int = 3, prompt_len: int = 5,
                new_tokens: int = 10, impl: str = "auto", seed: int = 0, trees: int | None = None) -> list[dict]:
    from treeffn.generation import DecodeLoop, Sampling, generate
    from treeffn.generation.capture import HostSyncGuard

    graphs = device.type == "cuda"
    out = []
    for family in families:
        for ffn, tree_family, placement in variants:
            rec = {"family": family, "ffn": ffn, "tree_family": tree_family, "placement": placement, "impl": impl}
            try:
                # gated trees (Llama) have no impl=triton (no training kernel); auto picks the decode kernel on CUDA
                layer_impl = "auto" if (family == "llama" and impl == "triton") else impl
                rec["impl"] = layer_impl
                model = small_model(family, ffn, tree_family, placement, device, impl=layer_impl, seed=seed,
                                    trees=trees)
                gen = torch.Generator().manual_seed(seed)
                prompt = torch.randint(3, model.config.vocab_size, (batch, prompt_len), generator=gen).to(device)
                ref = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                     max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                     pad_token_id=1)[:, prompt_len:].cpu()
                eager = generate(model, prompt, new_tokens).tokens
                rec["eager_equals_hf"] = bool(torch.equal(eager, ref))
                loop = DecodeLoop(model, batch, prompt_len + new_tokens)
                loop.run(prompt, 2)
                with HostSyncGuard():
                    loop.greedy_step()
                    loop.forward_step()
                rec["steps_sync_free"] = True
                ok = rec["eager_equals_hf"]
                if graphs:
                    rec["graph_equals_hf"] = bool(torch.equal(generate(model, prompt, new_tokens, graphs=True).tokens, ref))
                    gl = DecodeLoop(model, batch, prompt_len + new_tokens, graphs=True)
                    res = gl.run(prompt, new_tokens, Sampling(greedy=False, top_k=1, seed=seed))
                    rec["graph_sampling_top1_equals_hf"] = bool(torch.equal(res.tokens, ref))
                    full = torch.cat([prompt, res.tokens[:, :-1].to(device)], dim=1)
                    with torch.no_grad():
                        hf_logits = model(full).logits[:, -1].double()
                    mine = gl.logits.double()
                    rec["graph_logits_max_rel_err"] = ((mine - hf_logits).abs().max()
                                                       / hf_logits.abs().max().clamp_min(1e-30)).item()
                    ok = ok and rec["graph_equals_hf"] and rec["graph_sampling_top1_equals_hf"] and (
                        rec["graph_logits_max_rel_err"] < 1e-9 if model.dtype == torch.float64 else True)
                rec["ok"] = ok
            except Exception as e:
                rec.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
            out.append(rec)
    return out
