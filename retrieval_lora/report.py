"""Evaluation reports: a markdown file and a self-contained HTML page with the same content.

A report holds: what was compared (split, baseline, candidate, test), the gate decision and its
reasons, the metrics table with significance marks, a plot of per-query deltas on the primary
metric (matplotlib PNG; embedded as a data URI in the HTML, beside it as a file for the
markdown), the worst regressions with their query text, and the run's details (config,
dataset, adapter). Both formats are rendered from one list of blocks, so they cannot disagree.

Significance marks: ▲ significantly better, ▼ significantly worse (paired test, p < alpha);
no mark: the difference may be noise.
"""

from __future__ import annotations

import base64
import html
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval_lora.config import save_config
from retrieval_lora.evaluation import Comparison, PairedComparison, write_trec_run
from retrieval_lora.gate import GateDecision
from retrieval_lora.manifest import replace_dir_atomic, staging_dir, write_json_atomic, write_text_atomic

PLOT_FILE = "per_query_deltas.png"
Block = tuple  # ("h1"|"h2"|"p", text) | ("ul", [items]) | ("table", header, rows) | ("img", alt)


@dataclass
class ReportFiles:
    """Where a report was written."""

    markdown: Path
    html: Path
    plot: Path | None


def significance_mark(delta: float, p_value: float, alpha: float) -> str:
    """▲ / ▼ for a significant gain / loss at `alpha`, "" otherwise."""
    if p_value >= alpha or delta == 0:
        return ""
    return "▲" if delta > 0 else "▼"


def plot_query_deltas(comparison: PairedComparison, metric: str) -> bytes:
    """PNG of every query's change on `metric`, sorted, green up / red down."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no display backend

    deltas = [row.delta for row in comparison.query_deltas(metric)]
    result = comparison.metrics[metric]
    figure = Figure(figsize=(8, 3.2), dpi=100)
    axes = figure.subplots()
    colors = ["#2e7d32" if d > 0 else "#c62828" if d < 0 else "#9e9e9e" for d in deltas]
    axes.bar(range(len(deltas)), deltas, width=1.0, color=colors)
    axes.axhline(0, color="black", linewidth=0.6)
    axes.set_xlim(-0.5, len(deltas) - 0.5)
    axes.set_xlabel(f"queries, sorted by change ({len(deltas)})")
    axes.set_ylabel(f"{metric}: candidate - baseline")
    axes.set_title(f"{metric} per query: {result.wins} better, {result.losses} worse, {result.ties} unchanged "
                   f"(mean {result.delta:+.4f})", fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _metric_rows(comparison: PairedComparison, alpha: float) -> list[list[str]]:
    return [[name, f"{r.baseline:.4f}", f"{r.candidate:.4f}",
             f"{r.delta:+.4f} {significance_mark(r.delta, r.p_value, alpha)}".strip(), f"{r.p_value:.4f}",
             f"{r.wins} / {r.losses} / {r.ties}"] for name, r in comparison.metrics.items()]


METRIC_HEADER = ["metric", "baseline", "candidate", "delta", "p-value", "better / worse / same"]


def comparison_blocks(comparison: PairedComparison, decision: GateDecision | None, *, title: str, alpha: float,
                      primary_metric: str, details: dict[str, Any] | None = None, worst: int = 10,
                      champion: PairedComparison | None = None) -> list[Block]:
    """The report's content for a baseline-vs-candidate comparison (and champion-vs-candidate, if any)."""
    test = "paired t-test" if comparison.stat_test == "student" else f"{comparison.stat_test} randomization test"
    blocks: list[Block] = [("h1", title), ("p", f"Split **{comparison.split}**, {comparison.num_queries} queries. "
                                                f"Baseline: **{comparison.baseline_name}**. Candidate: "
                                                f"**{comparison.candidate_name}**. Significance: {test}, alpha = {alpha}.")]
    if decision is not None:
        blocks += [("h2", f"Gate decision: {'PASSED' if decision.passed else 'FAILED'}"), ("ul", decision.reasons)]
    blocks += [("h2", "Metrics"), ("table", METRIC_HEADER, _metric_rows(comparison, alpha)),
               ("p", f"▲ / ▼: significantly better / worse (p < {alpha}); no mark: may be noise.")]
    if champion is not None:
        blocks += [("h2", f"Against the promoted champion {champion.baseline_name}"),
                   ("table", METRIC_HEADER, _metric_rows(champion, alpha))]
    blocks += [
               ("h2", f"Per-query change of {primary_metric}"), ("img", f"per-query {primary_metric} deltas")]
    regressions = comparison.worst_regressions(primary_metric, worst)
    blocks.append(("h2", f"Worst regressions on {primary_metric}"))
    if regressions:
        blocks.append(("table", ["query id", "query", "baseline", "candidate", "delta"],
                       [[r.query_id, _clip(r.text), f"{r.baseline:.4f}", f"{r.candidate:.4f}", f"{r.delta:+.4f}"]
                        for r in regressions]))
    else:
        blocks.append(("p", "No query scores lower under the candidate."))
    return blocks + details_blocks(details)


def metrics_blocks(metrics: dict[str, float], *, title: str, split: str, num_queries: int, name: str,
                   details: dict[str, Any] | None = None) -> list[Block]:
    """The report's content for one system evaluated alone (no comparison, no gate)."""
    return [("h1", title), ("p", f"Split **{split}**, {num_queries} queries. System: **{name}**."), ("h2", "Metrics"),
            ("table", ["metric", "value"], [[metric, f"{value:.4f}"] for metric, value in metrics.items()]),
            *details_blocks(details)]


def details_blocks(details: dict[str, Any] | None) -> list[Block]:
    if not details:
        return []
    return [("h2", "Details"), ("table", ["setting", "value"], [[key, str(value)] for key, value in details.items()])]


def _clip(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render_markdown(blocks: list[Block], plot_file: str | None) -> str:
    """Markdown of `blocks`; the plot is referenced as the file `plot_file` beside it."""
    out = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            out.append(f"{'#' if kind == 'h1' else '##'} {block[1]}")
        elif kind == "p":
            out.append(block[1])
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in block[1]))
        elif kind == "table":
            # `|` would end a cell and `_` start emphasis: query ids such as __call__ must show as written
            cells = lambda row: "| " + " | ".join(str(c).replace("|", "\\|").replace("_", "\\_") for c in row) + " |"  # noqa: E731
            out.append("\n".join([cells(block[1]), cells(["---"] * len(block[1])), *map(cells, block[2])]))
        elif kind == "img" and plot_file:
            out.append(f"![{block[1]}]({plot_file})")
    return "\n\n".join(out) + "\n"


STYLE = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}
th{background:#f3f3f3}img{max-width:100%}h2.PASSED{color:#2e7d32}h2.FAILED{color:#c62828}"""


def _inline(text: str) -> str:
    """Escape, then turn **bold** into <b>."""
    parts = html.escape(text).split("**")
    return "".join(f"<b>{part}</b>" if index % 2 else part for index, part in enumerate(parts))


def render_html(blocks: list[Block], plot_png: bytes | None) -> str:
    """A standalone HTML page of `blocks` (styles inline, plot embedded as a base64 data URI)."""
    title = next((block[1] for block in blocks if block[0] == "h1"), "retrieval-lora report")
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{STYLE}</style></head><body>"]
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            status = block[1].rsplit(" ", 1)[-1] if block[1].startswith("Gate decision") else ""
            out.append(f"<{kind} class='{status}'>{_inline(block[1])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_inline(block[1])}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in block[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(str(c))}</th>" for c in block[1])
            body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in block[2])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img" and plot_png:
            data = base64.b64encode(plot_png).decode("ascii")
            out.append(f"<img alt='{html.escape(block[1])}' src='data:image/png;base64,{data}'>")
    return "\n".join(out + ["</body></html>"]) + "\n"


def write_report(out_dir: str | Path, blocks: list[Block], plot_png: bytes | None = None) -> ReportFiles:
    """Write `report.md`, `report.html` (and the plot PNG) into `out_dir`, each atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_path = None
    if plot_png:
        plot_path = out_dir / PLOT_FILE
        tmp = out_dir / f".{PLOT_FILE}.tmp-{os.getpid()}"
        tmp.write_bytes(plot_png)
        os.replace(tmp, plot_path)
    write_text_atomic(out_dir / "report.md", render_markdown(blocks, PLOT_FILE if plot_png else None))
    write_text_atomic(out_dir / "report.html", render_html(blocks, plot_png))
    return ReportFiles(out_dir / "report.md", out_dir / "report.html", plot_path)


def write_comparison_report(out_dir: str | Path, comparison: PairedComparison, decision: GateDecision | None = None,
                            *, title: str = "Adapter vs frozen base", alpha: float = 0.05,
                            primary_metric: str | None = None, details: dict[str, Any] | None = None,
                            worst: int = 10, champion: PairedComparison | None = None) -> ReportFiles:
    """Render and write the full report of a comparison (and its gate decision, if any).

    `primary_metric` (default: the decision's, else the first evaluated) is the one plotted and
    whose worst regressions are listed.
    """
    primary = primary_metric or (decision.primary_metric if decision else next(iter(comparison.metrics)))
    blocks = comparison_blocks(comparison, decision, title=title, alpha=alpha, primary_metric=primary,
                               details=details, worst=worst, champion=champion)
    return write_report(out_dir, blocks, plot_query_deltas(comparison, primary))


def comparison_summary(comparison: Comparison) -> dict[str, Any]:
    """Small JSON-ready metrics of a comparison (what the registry stores as metrics.json)."""
    paired = comparison.paired
    summary: dict[str, Any] = {"split": comparison.split, "baseline_name": comparison.baseline_name,
                               "baseline": comparison.baseline, "adapter": comparison.adapter,
                               "baselines_considered": comparison.baselines}
    if paired is not None:
        summary.update(num_queries=paired.num_queries, stat_test=paired.stat_test,
                       delta={m: r.delta for m, r in paired.metrics.items()},
                       p_value={m: r.p_value for m, r in paired.metrics.items()},
                       wins_losses_ties={m: [r.wins, r.losses, r.ties] for m, r in paired.metrics.items()})
    if comparison.champion is not None:
        summary["champion"] = {"spec": comparison.champion.baseline_name,
                               "metrics": {m: r.baseline for m, r in comparison.champion.metrics.items()},
                               "p_value": {m: r.p_value for m, r in comparison.champion.metrics.items()}}
    return summary


def write_evaluation(out_dir: str | Path, comparison: Comparison, decision: GateDecision | None = None, *,
                     title: str = "Adapter vs frozen base", alpha: float = 0.05, primary_metric: str | None = None,
                     details: dict[str, Any] | None = None, worst: int = 10, save_runs: bool = True,
                     config: Any = None, extra_files: dict[str, Any] | None = None) -> ReportFiles:
    """Write a whole evaluation folder at once (built aside, renamed into place; replaces `out_dir`).

    Files: report.md, report.html, per_query_deltas.png, metrics.json (summary),
    comparison.json (per-query scores), decision.json (if gated), runs/*.trec (if `save_runs`),
    config.yaml (if `config`, a config dataclass: rerun with `--config`), and any `extra_files`
    (name -> JSON-ready data, e.g. a manifest).

    Raises:
        ValueError: `comparison` has no paired results (build it with `compare_with_base`).
    """
    if comparison.paired is None:
        raise ValueError("comparison.paired is missing; build the comparison with compare_with_base")
    target = Path(out_dir)
    staging = staging_dir(target)
    write_comparison_report(staging, comparison.paired, decision, title=title, alpha=alpha,
                            primary_metric=primary_metric, details=details, worst=worst, champion=comparison.champion)
    write_json_atomic(staging / "metrics.json", comparison_summary(comparison))
    write_json_atomic(staging / "comparison.json", comparison.paired.to_dict())
    if comparison.champion is not None:
        write_json_atomic(staging / "champion_comparison.json", comparison.champion.to_dict())
    if decision is not None:
        write_json_atomic(staging / "decision.json", decision.to_dict())
    if save_runs:
        write_trec_run(comparison.baseline_run, staging / "runs" / "baseline.trec", "baseline")
        write_trec_run(comparison.adapter_run, staging / "runs" / "adapter.trec", "adapter")
    if config is not None:
        save_config(config, staging / "config.yaml")
    for name, data in (extra_files or {}).items():
        write_json_atomic(staging / name, data)
    replace_dir_atomic(staging, target)
    return ReportFiles(target / "report.md", target / "report.html", target / PLOT_FILE)
