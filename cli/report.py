"""``treeffn report sweep=<name or dir> [key=value ...]``: the table of a sweep's runs (settings:
conf/report.yaml). Nothing here trains or evaluates: treeffn/results/report.py turns runs into rows."""

from __future__ import annotations

import sys

from treeffn.cli.entry import bool_setting, path_setting, run_verb


def report(cfg: dict) -> int:
    from treeffn.results.report import build_report, write_report

    plots = bool_setting(cfg, "plots")
    metric = None if cfg["metric"] is None else str(cfg["metric"])
    table = build_report(path_setting(cfg, "sweep"), runs_root=path_setting(cfg, "runs_root"), metric=metric,
                         out=path_setting(cfg, "out"))
    write_report(table, plots=plots)
    print(table.files["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in table.files.values()))
    return 0


def main(argv: list[str] | None = None) -> int:
    from treeffn.results.report import ReportError

    return run_verb("report", report, sys.argv[1:] if argv is None else argv, errors=(ReportError,))


if __name__ == "__main__":
    raise SystemExit(main())
