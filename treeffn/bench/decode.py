"""``treeffn bench mode=decode``: tokens/s of whole models through treeffn's decode loop.

Dense and tree versions of one preset (random init, no download), built on the device in the
chosen dtype, decode the same random prompts through ``treeffn.generation.DecodeLoop`` — the
loop ``treeffn generate`` runs — eagerly and with the step captured in a CUDA graph (GPU only).
For each batch size and mode the models run in rounds, in alternating order (dense, tree,
tree, dense, ...), and every figure is the median over rounds. End-of-text is ignored so that
every run does the same number of steps. The first round's greedy tokens of the eager and
graphed runs of one model are compared (``differing_sequences``).

Also here: ``profile_step``, a torch.profiler table of the kernels of one decode step.
"""

from __future__ import annotations

import statistics
import time

import torch

from treeffn.bench.timing import sync

OPT_VOCAB = 50272  # OPT's own vocabulary: the LM head as in the published models


def preset_config(name: str) -> dict:
    """conf/model/<name>.yaml as a dict (plain YAML, no Hydra needed): from the source checkout
    when there is one (scripts run from a checkout without installing), else the installed package."""
    from pathlib import Path

    import yaml

    path = Path(__file__).resolve().parents[3] / "conf" / "model" / f"{name}.yaml"
    if not path.is_file():
        from importlib import resources

        path = resources.files("treeffn.conf").joinpath("model", f"{name}.yaml")
    if not path.is_file():
        raise ValueError(f"no model preset {name!r} in treeffn/conf/model")
    return yaml.safe_load(path.read_text())


def tree_config(ffn: str, depth: int = 6, trees: int | None = None, placement: str = "node",
                activation: str = "gelu", family: str = "node") -> dict:
    return {"ffn": ffn, "family": family, "depth": depth, "trees": trees, "placement": placement,
            "activation": activation, "bias": True, "impl": "auto", "track_stats": False, "leaf_width": None,
            "hardening_weight": 0.0, "init": "random"}


def build_lm(preset: str | dict, ffn: str, device, dtype, vocab: int = OPT_VOCAB, depth: int = 6,
             trees: int | None = None, placement: str = "node", seed: int = 0, layers: int | None = None):
    """A random-init causal LM of a preset, dense or tree (node family), built on ``device``."""
    from treeffn.models.build import build_model

    model_cfg = dict(preset_config(preset) if isinstance(preset, str) else preset)
    if layers:
        model_cfg["num_hidden_layers"] = layers
    tcfg = tree_config(ffn, depth, trees, placement, model_cfg["activation"])
    torch.manual_seed(seed)
    with torch.device(device):
        model = build_model(model_cfg, tcfg, vocab_size=vocab, pad_id=1, bos_id=2, eos_id=2)
    return model.to(dtype).eval()


def measure_decode(models: dict, batches: list[int], prompt_len: int, new_tokens: int, modes: list[str],
                   rounds: int = 5, seed: int = 0, log=print) -> list[dict]:
    """Records per (batch, mode, model): medians over rounds of ms per decode step and tokens/s."""
    from treeffn.generation import DecodeLoop

    names = list(models)
    device = next(next(iter(models.values())).parameters()).device
    vocab = min(m.config.vocab_size for m in models.values())
    gen = torch.Generator().manual_seed(seed)
    records, tokens = [], {}
    for B in batches:
        prompt = torch.randint(3, vocab, (B, prompt_len), generator=gen).to(device)
        for mode in modes:
            try:
                loops = {n: DecodeLoop(models[n], B, prompt_len + new_tokens, graphs=mode == "graph") for n in names}
                # warm-up (and the graph capture): kernels compiled, workspaces allocated, clocks up
                capture = {n: loops[n].run(prompt, min(8, new_tokens), stop_at_eos=False).capture_s for n in names}
                runs = {n: [] for n in names}
                for r in range(rounds):
                    for n in (names if r % 2 == 0 else names[::-1]):
                        out = loops[n].run(prompt, new_tokens, stop_at_eos=False)
                        runs[n].append(out)
                        if r == 0:
                            tokens[(n, B, mode)] = out.tokens
            except Exception as e:  # one mode failing (e.g. a capture) leaves the others measured
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                log(f"decode B={B} {mode}: FAILED {msg}")
                records += [{"model": n, "batch": B, "mode": mode, "error": msg} for n in names]
                loops = {}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            for n in names:
                outs = runs[n]
                rec = {"model": n, "batch": B, "mode": mode, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
                       "rounds": rounds, "ms_per_step": statistics.median(o.ms_per_step for o in outs),
                       "decode_tokens_per_s": statistics.median(o.decode_tokens_per_s for o in outs),
                       "tokens_per_s": statistics.median(o.tokens_per_s for o in outs),
                       "prefill_ms": 1e3 * statistics.median(o.prefill_s for o in outs),
                       "ms_per_step_rounds": [round(o.ms_per_step, 4) for o in outs],
                       "capture_s": capture[n]}
                records.append(rec)
                log(f"decode B={B:<3} {mode:<5} {n:<6} {rec['ms_per_step']:8.3f} ms/step  "
                    f"{rec['decode_tokens_per_s']:10.1f} tok/s  (rounds {rec['ms_per_step_rounds']})")
            del loops
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for rec in records:  # eager vs graph identity of the same model, batch and prompts
        if "error" in rec:
            continue
        a, b = tokens.get((rec["model"], rec["batch"], "eager")), tokens.get((rec["model"], rec["batch"], "graph"))
        if rec["mode"] == "graph" and a is not None and b is not None:
            rec["differing_sequences_vs_eager"] = int((a != b).any(dim=1).sum())
            diff = (a != b).any(dim=0).nonzero()
            rec["first_differing_step_vs_eager"] = int(diff[0]) if diff.numel() else None
    return records


def ratios(records: list[dict], base: str = "dense") -> list[dict]:
    """tree tokens/s over dense tokens/s per (batch, mode), from the medians."""
    out = []
    keyed = {(r["model"], r["batch"], r["mode"]): r for r in records if "error" not in r}
    for (name, B, mode), r in keyed.items():
        if name == base or (base, B, mode) not in keyed:
            continue
        d = keyed[(base, B, mode)]
        out.append({"model": name, "batch": B, "mode": mode,
                    "speed_vs_dense": r["decode_tokens_per_s"] / d["decode_tokens_per_s"],
                    "ms_per_step": r["ms_per_step"], "dense_ms_per_step": d["ms_per_step"]})
    return out


def profile_step(loop, steps: int = 3, top: int = 25) -> dict:
    """Kernels of ``steps`` eager greedy decode steps (the graphed step launches the same kernels):
    per kernel the calls and device µs per step, sorted by time; plus the summed device time."""
    from torch.profiler import ProfilerActivity, profile

    device = loop.decoder.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    loop.pos.fill_(1)
    loop.count.zero_()
    with torch.no_grad():
        loop.greedy_step()  # warm
        sync(device)
        with profile(activities=activities) as prof:
            for _ in range(steps):
                loop.greedy_step()
            sync(device)
    from torch.autograd import DeviceType

    rows = []
    for e in prof.key_averages():
        if device.type == "cuda":
            # the kernels (and memsets / copies) themselves: operator rows would count them twice
            if getattr(e, "device_type", None) != DeviceType.CUDA:
                continue
            dev_us = getattr(e, "self_device_time_total", None)
            if dev_us is None:
                dev_us = getattr(e, "self_cuda_time_total", 0.0)
        else:
            if not e.key.startswith("aten::"):
                continue
            dev_us = e.self_cpu_time_total
        rows.append({"name": e.key[:120], "calls_per_step": e.count / steps, "us_per_step": dev_us / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows)
    return {"steps": steps, "device_us_per_step": total, "kernels_per_step": sum(r["calls_per_step"] for r in rows),
            "top": rows[:top], "timer": "CUDA kernel time (CUPTI)" if device.type == "cuda" else "CPU op self time"}


def run_decode_bench(args) -> dict:
    """The ``mode=decode`` run: dense vs tree of one preset, batches, eager and graphed."""
    from treeffn.bench.problems import DTYPES
    from treeffn.bench.timing import environment

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    env = environment(device)
    t0 = time.perf_counter()
    models = {"dense": build_lm(args.decode_model, "dense", device, dtype, depth=args.decode_depth,
                                layers=args.decode_layers),
              "tree": build_lm(args.decode_model, "tree", device, dtype, depth=args.decode_depth,
                               layers=args.decode_layers)}
    build_s = time.perf_counter() - t0
    modes = ["eager", "graph"] if device.type == "cuda" else ["eager"]
    records = measure_decode(models, args.decode_batches, args.decode_prompt, args.decode_new, modes,
                             rounds=args.decode_rounds, seed=args.seed)
    return {"environment": env, "args": vars(args), "build_s": build_s, "decode": records,
            "ratios": ratios(records), "model": args.decode_model,
            "params": {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}}


def decode_markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# treeffn bench mode=decode — {env['date']}", "",
             f"- device: {env['device_name']}; torch {env['torch']}; triton {env['triton']}; "
             f"transformers {env.get('transformers')}; load average {env.get('load_average_1_5_15')}",
             f"- command: `{env['command']}`",
             f"- model: {result['model']} shape, random init, dtype {result['args']['dtype']}; prompt "
             f"{result['args']['decode_prompt']} tokens, {result['args']['decode_new']} new tokens, greedy, "
             f"end-of-text ignored; medians of {result['args']['decode_rounds']} rounds in alternating order",
             "- ms/step: wall time of the decode steps (host included, synchronised at the end) per step; "
             "tokens/s = batch / (s per step)", "",
             "| batch | mode | dense ms/step | tree ms/step | dense tok/s | tree tok/s | tree / dense |",
             "|---|---|---|---|---|---|---|"]
    keyed = {(r["model"], r["batch"], r["mode"]): r for r in result["decode"] if "error" not in r}
    for ratio in result["ratios"]:
        d = keyed[("dense", ratio["batch"], ratio["mode"])]
        t = keyed[(ratio["model"], ratio["batch"], ratio["mode"])]
        lines.append(f"| {ratio['batch']} | {ratio['mode']} | {d['ms_per_step']:.3f} | {t['ms_per_step']:.3f} | "
                     f"{d['decode_tokens_per_s']:.1f} | {t['decode_tokens_per_s']:.1f} | "
                     f"{ratio['speed_vs_dense']:.2f}× |")
    return "\n".join(lines) + "\n"
