"""What bounds tree decode speed, and whether graphed and eager decoding agree (issue 14, 2nd call).

    PYTHONUNBUFFERED=1 python3 scripts/h200_decode_bounds.py --out $OUT     # one H200
    python scripts/h200_decode_bounds.py --out /tmp/b --smoke               # CPU check (eager only)

1. floor: OPT-1.3B shape (random init, bf16), CUDA-graphed decode at batch 1, 8, 32 of three
   models that differ only in the FFN: dense, tree (K=64, D=6) and "no FFN" (every FFN replaced
   by one kernel that writes zeros). The no-FFN step is what every model pays outside its FFN:
   dense / no-FFN is the highest tree/dense ratio any tree kernel could reach. Alternating order,
   medians of rounds (treeffn.bench.decode.measure_decode, what the first call used).
2. identity: greedy tokens of the eager and the graphed loop for the same model and prompts, in
   float32 and in bf16 (batch 8, 32 new tokens). For every bf16 sequence that differs, the
   teacher-forced eager logits at the first differing step give the gap between the two tokens
   chosen, beside the median top-1/top-2 gap over all steps: a gap at bf16 rounding level is a
   tie broken differently, not a wrong step.
Writes <out>/bounds.json and prints a short table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, not installed


class ZeroFFN(nn.Module):
    """An FFN that costs one kernel and adds nothing: the residual stream passes unchanged."""

    def forward(self, h):
        return torch.zeros_like(h)


def no_ffn(model):
    for layer in model.model.decoder.layers:
        layer.fc1, layer.activation_fn, layer.fc2 = ZeroFFN(), nn.Identity(), nn.Identity()
    return model


def teacher_forced_gaps(model, prompt, eager, graph) -> dict:
    """At the first step where eager and graphed tokens differ (per sequence), the eager model's
    logit gap between its token and the graphed token; and the top-1/top-2 gap over all steps."""
    P = prompt.shape[1]
    with torch.no_grad():
        logits = model(input_ids=torch.cat([prompt, eager.to(prompt.device)], 1)).logits.float()
    step_logits = logits[:, P - 1:P - 1 + eager.shape[1]]  # the logits that chose each new token
    top2 = step_logits.topk(2, dim=-1).values
    all_gaps = (top2[..., 0] - top2[..., 1]).flatten()
    gaps = []
    for b in range(eager.shape[0]):
        diff = (eager[b] != graph[b]).nonzero()
        if diff.numel():
            s = int(diff[0])
            row = step_logits[b, s]
            gaps.append({"sequence": b, "step": s, "gap": float(row[eager[b, s]] - row[graph[b, s]]),
                         "top1_logit": float(row.max())})
    return {"differing": gaps, "median_top2_gap_all_steps": float(all_gaps.median()),
            "min_top2_gap_all_steps": float(all_gaps.min()), "steps": int(all_gaps.numel())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    from treeffn.generation import DecodeLoop
    from treeffn.bench.decode import build_lm, measure_decode, ratios

    dev = torch.device("cpu" if args.smoke else "cuda")
    preset = "tiny" if args.smoke else "opt1.3b"
    vocab = 512 if args.smoke else 50272
    batches, new, rounds = ([1, 2], 8, 2) if args.smoke else ([1, 8, 32], 64, 5)
    modes = ["eager"] if args.smoke else ["graph"]
    out: dict = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
                 "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "preset": preset}
    t0 = time.time()

    # 1. the floor: what a step costs outside the FFN
    models = {ffn: build_lm(preset, "dense" if ffn == "no_ffn" else ffn, dev, torch.bfloat16, vocab=vocab)
              for ffn in ("dense", "tree", "no_ffn")}
    no_ffn(models["no_ffn"])
    records = measure_decode(models, batches, 32, new, modes, rounds=rounds)
    out["floor"] = {"records": records, "ratios": ratios(records)}
    by = {(r["model"], r["batch"]): r["ms_per_step"] for r in records if "error" not in r}
    n_layers = models["dense"].config.num_hidden_layers
    out["floor"]["table"] = [{"batch": B, "dense_ms": by.get(("dense", B)), "tree_ms": by.get(("tree", B)),
                              "no_ffn_ms": by.get(("no_ffn", B)),
                              "tree_over_dense": by[("dense", B)] / by[("tree", B)],
                              "ceiling_dense_over_no_ffn": by[("dense", B)] / by[("no_ffn", B)],
                              "tree_ffn_ms_per_layer": (by[("tree", B)] - by[("no_ffn", B)]) / n_layers,
                              "dense_ffn_ms_per_layer": (by[("dense", B)] - by[("no_ffn", B)]) / n_layers}
                             for B in batches if ("no_ffn", B) in by and ("tree", B) in by]
    del models
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    # 2. eager vs graphed greedy tokens, float32 and bf16
    ident = {}
    if not args.smoke:
        B = 8
        prompt = torch.randint(3, vocab, (B, 32), generator=torch.Generator().manual_seed(11)).to(dev)
        for dtype in (torch.float32, torch.bfloat16):
            for ffn in ("dense", "tree"):
                model = build_lm(preset, ffn, dev, dtype, vocab=vocab)
                toks = {}
                for mode in ("eager", "graph"):
                    loop = DecodeLoop(model, B, 32 + 32, graphs=mode == "graph")
                    loop.run(prompt, 4, stop_at_eos=False)  # warm-up / capture
                    toks[mode] = loop.run(prompt, 32, stop_at_eos=False).tokens
                    del loop
                differing = int((toks["eager"] != toks["graph"]).any(dim=1).sum())
                rec = {"dtype": str(dtype), "model": ffn, "batch": B, "new_tokens": 32,
                       "differing_sequences": differing}
                if differing:
                    rec["gaps"] = teacher_forced_gaps(model, prompt, toks["eager"], toks["graph"])
                ident[f"{ffn}_{str(dtype).removeprefix('torch.')}"] = rec
                print(f"identity {ffn:<5} {str(dtype):<15} differing sequences {differing}/{B}"
                      + (f"; gaps at the first difference {[round(g['gap'], 4) for g in rec['gaps']['differing']]}, "
                         f"median top-2 gap {rec['gaps']['median_top2_gap_all_steps']:.4f}" if differing else ""),
                      flush=True)
                del model
                torch.cuda.empty_cache()
    out["identity"] = ident
    out["elapsed_s"] = round(time.time() - t0, 1)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bounds.json").write_text(json.dumps(out, indent=2) + "\n")
    print("\nbatch  dense ms  tree ms  no-FFN ms  tree/dense  ceiling dense/no-FFN  FFN ms/layer (dense, tree)")
    for r in out["floor"]["table"]:
        print(f"{r['batch']:>5} {r['dense_ms']:9.3f} {r['tree_ms']:8.3f} {r['no_ffn_ms']:10.3f} {r['tree_over_dense']:10.2f}x"
              f" {r['ceiling_dense_over_no_ffn']:20.2f}x   {1e3 * r['dense_ffn_ms_per_layer']:.1f} µs, "
              f"{1e3 * r['tree_ffn_ms_per_layer']:.1f} µs")
    print(f"elapsed {out['elapsed_s']} s")


if __name__ == "__main__":
    main()
