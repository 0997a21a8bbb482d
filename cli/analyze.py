"""``treeffn analyze run=<run dir> [key=value ...]``: routing statistics of a run's checkpoints
(settings: conf/analyze.yaml; the work is in treeffn.analysis.analyze)."""

from __future__ import annotations

import sys

from treeffn.cli.entry import int_setting, path_setting, run_verb


def analyze(cfg: dict) -> int:
    from pathlib import Path

    from treeffn.analysis.analyze import NothingToAnalyse, analyse_run, format_verdicts

    run, out = path_setting(cfg, "run"), path_setting(cfg, "out")
    max_blocks = int_setting(cfg, "max_blocks", 1)
    try:
        analysis = analyse_run(Path(run), str(cfg["text"]), max_blocks, out)
    except NothingToAnalyse as e:
        print(f"treeffn analyze: nothing to analyse: {e}")
        return 0
    t = analysis["thresholds"]
    print(f"routing on {analysis['tokens']:,} held-out tokens ({analysis['text']}), hard routing (eval path), "
          f"{len(analysis['checkpoints'])} checkpoints")
    for line in format_verdicts(analysis):
        print(line)
    print(f"verdicts: balanced if normalized leaf entropy >= {t['balanced_if_leaf_entropy_at_least']}, "
          f"collapsed if < {t['collapsed_if_leaf_entropy_below']}, collapsing in between")
    folder = Path(out) if out else Path(run) / "analysis"
    print(f"wrote {folder / 'analysis.json'} and {', '.join(analysis['plots'])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_verb("analyze", analyze, sys.argv[1:] if argv is None else argv, errors=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    raise SystemExit(main())
