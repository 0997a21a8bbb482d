"""``treeffn analyze run=<run dir> [key=value ...]``: routing statistics of a run's checkpoints
(settings: conf/analyze.yaml; the work is in treeffn.analysis.analyze)."""

from __future__ import annotations

import sys

from treeffn.cli.entry import BadInput, int_setting, path_setting, run_verb


def analyze(cfg: dict) -> int:
    from pathlib import Path

    from treeffn.analysis.analyze import NothingToAnalyse, analyse_run, format_verdicts

    run, out = path_setting(cfg, "run"), path_setting(cfg, "out")
    max_blocks = cfg.get("max_blocks")
    if max_blocks == "all":
        max_blocks = None
    elif isinstance(max_blocks, bool) or not isinstance(max_blocks, int) or max_blocks < 1:
        raise BadInput(f"max_blocks={max_blocks!r} is not allowed; use an integer >= 1 or all")
    seed = int_setting(cfg, "seed", 0)
    device = str(cfg.get("device"))
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise BadInput(f"device={device} is not allowed; use auto, cpu, cuda or cuda:<index>")
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        analysis = analyse_run(Path(run), str(cfg["text"]), max_blocks, out, device, seed)
    except NothingToAnalyse as e:
        print(f"treeffn analyze: nothing to analyse: {e}")
        return 0
    t = analysis["thresholds"]
    print(f"routing on {analysis['tokens']:,} held-out tokens ({analysis['text']}: {analysis['sample']}), hard "
          f"routing (eval path), {len(analysis['checkpoints'])} checkpoints")
    for line in format_verdicts(analysis):
        print(line)
    print(f"trends against the initial weights: spreading / concentrating if the leaf entropy rose / fell by >= "
          f"{t['trend_if_entropy_change_at_least']}; absolute verdicts: balanced if >= "
          f"{t['balanced_if_leaf_entropy_at_least']}, collapsed if < {t['collapsed_if_leaf_entropy_below']}")
    if analysis.get("against_training"):
        c = analysis["against_training"]
        print(f"against the run's last validation (same {c['tokens']:,} tokens): largest per-layer differences "
              f"dead nodes {c['max_abs_diff_dead_frac']:.2g}, leaf entropy {c['max_abs_diff_leaf_entropy']:.2g}")
    folder = Path(out) if out else Path(run) / "analysis"
    print(f"wrote {folder / 'analysis.json'} and {', '.join(analysis['plots'])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_verb("analyze", analyze, sys.argv[1:] if argv is None else argv, errors=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    raise SystemExit(main())
