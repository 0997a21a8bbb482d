"""The results of one ``treeffn eval`` as a rich table."""

from __future__ import annotations


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        return f"{value:,.2f}" if abs(value) >= 100 else f"{value:.4f}"
    return str(value)


def results_table(record: dict, perplexity: list, tasks: list, title: str):
    """``perplexity``: PerplexityResult dicts of this invocation; ``tasks``: TaskResult dicts."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col, justify in (("task / text set", "left"), ("shots", "right"), ("metric", "left"), ("value", "right"),
                         ("± stderr", "right"), ("n", "right")):
        table.add_column(col, justify=justify)
    for p in perplexity:
        table.add_row(p["name"], "", "perplexity", _fmt(p["ppl"]), "", f"{p['tokens']:,} tokens")
    for t in tasks:
        n = "" if t["samples"] is None else f"{t['samples']} docs"
        for i, (metric, value) in enumerate(t["metrics"].items()):
            table.add_row(t["task"] if i == 0 else "", str(t["shots"]) if i == 0 else "", metric, _fmt(value),
                          _fmt(t["stderr"].get(metric)), n if i == 0 else "")
        if t["metrics"]:
            table.add_section()
    return table
