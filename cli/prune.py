"""``treeffn prune run=<run dir> [key=value ...]``: remove subtrees no token reaches (settings:
conf/prune.yaml; the work is in treeffn.analysis.pruning)."""

from __future__ import annotations

import sys

from treeffn.cli.entry import int_setting, path_setting, run_verb


def prune(cfg: dict) -> int:
    from treeffn.analysis.pruning import prune_run

    report = prune_run(path_setting(cfg, "run"), out=path_setting(cfg, "out"), text=path_setting(cfg, "text"),
                       min_visits=int_setting(cfg, "min_visits", 0),
                       batch_size=int_setting(cfg, "batch_size", 1, optional=True),
                       max_blocks=int_setting(cfg, "max_blocks", 1, optional=True))
    print(f"counted routes of {report.count_tokens:,} tokens ({report.text}), dropping nodes visited "
          f"<= {report.min_visits} times")
    for i, layer in enumerate(report.layers):
        print(f"  layer {i}: kept {layer['kept']} of {layer['total']} {layer['kind']}")
    print(f"parameters: {report.params_before:,} -> {report.params_after:,} "
          f"(FFN {report.ffn_params_before:,} -> {report.ffn_params_after:,}, "
          f"{100 * (1 - report.ffn_params_after / report.ffn_params_before):.1f}% of FFN parameters removed)")
    print(f"perplexity (hard routing): {report.ppl_before:.4f} -> {report.ppl_after:.4f} "
          f"(change {report.ppl_change:+.6f})")
    print(f"pruned model: {report.out_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_verb("prune", prune, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    raise SystemExit(main())
