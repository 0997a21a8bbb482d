"""``treeffn report sweep=<name or dir> [key=value ...]``: the table of a sweep's runs.

    sweep=<name|dir>   a sweep name (sweeps/sweep/<name>.yaml) or the sweep dir `treeffn train -m` wrote
    runs_root=<dir>    where runs/ is, for a sweep given by name (default: the sweep's own, runs)
    out=<dir>          where the files go (default <sweep dir>/report)
    metric=<key>       the result.json number to aggregate (default: the sweep's, val_ppl)
    plots=true|false   PNG plots (needs matplotlib)

Writes table.md, table.csv, table.tex, runs.csv and the plots; prints the Markdown table.
Exit status 2 with one line on bad input. Nothing here trains or evaluates: see
treeffn/results/report.py for how runs become rows.
"""

from __future__ import annotations

import sys

KEYS = ("sweep", "runs_root", "out", "metric", "plots")


def parse(argv: list[str]) -> dict[str, str]:
    args: dict[str, str] = {}
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in KEYS:
            raise ValueError(f"{item!r} is not an argument of treeffn report; use key=value with key one of: "
                             f"{', '.join(KEYS)}")
        args[key] = value
    if not args.get("sweep"):
        raise ValueError("sweep=<name or dir> is required, e.g. treeffn report sweep=table_strategies_opt125m_smoke")
    if args.get("plots", "true").lower() not in ("true", "false"):
        raise ValueError(f"plots={args['plots']} is not allowed; use plots=true or plots=false")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(__doc__)
        return 0
    from treeffn.results.report import ReportError, build_report, write_report

    try:
        args = parse(argv)
        report = build_report(args["sweep"], runs_root=args.get("runs_root"), metric=args.get("metric"),
                              out=args.get("out"))
        write_report(report, plots=args.get("plots", "true").lower() == "true")
    except (ValueError, ReportError) as e:
        print(f"treeffn report: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(report.files["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in report.files.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
