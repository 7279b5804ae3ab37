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
import dataclasses
import html
import io
import os
import re
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


ADAPTER_ROLES = ("adapter", "hybrid-adapter", "adapter-reranker")


def _test_name(stat_test: str) -> str:
    return "paired t-test" if stat_test == "student" else f"{stat_test} randomization test"


def _p_text(p_value: float) -> str:
    return "p < 0.0001" if p_value < 1e-4 else f"p = {p_value:.4f}"


def verdict(comparison: Comparison, alpha: float = 0.05) -> str:
    """One sentence: which pipeline scores best on the primary metric, and whether it beats the runner-up
    significantly. "" when the comparison has no pipeline rows."""
    best, test = comparison.best_system(), comparison.best_vs_runner_up
    metric = comparison.primary_metric
    if best is None or test is None:
        return ""
    result = test.metrics[metric]
    significance = (f"significant at {alpha}" if result.significant(alpha) and result.delta > 0
                    else "not significant: the two may be equally good")
    adapter = "" if best.role in ADAPTER_ROLES else "; no pipeline with the adapter beats it"
    return (f"Best pipeline by {metric} on {comparison.split}: {best.name} at {result.candidate:.4f}, "
            f"{result.delta:+.4f} over the runner-up {test.baseline_name} ({result.baseline:.4f}; "
            f"{_test_name(test.stat_test)}, {_p_text(result.p_value)}, {significance}){adapter}.")


def _system_cells(comparison: Comparison, alpha: float) -> list[list[str]]:
    metric, best = comparison.primary_metric, comparison.best_system()
    rows = []
    for row in comparison.systems:
        test = comparison.tests.get(row.name)
        if test is None:
            against = ["-", "-", "-"]
        else:
            r = test.metrics[metric]
            against = [test.candidate_name, f"{r.delta:+.4f} {significance_mark(r.delta, r.p_value, alpha)}".strip(),
                       f"{r.p_value:.4f}"]
        name = f"{row.name} (best)" if row is best else row.name
        rows.append([name, *(f"{value:.4f}" for value in row.metrics.values()), *against])
    return rows


def systems_blocks(comparison: Comparison, alpha: float) -> list[Block]:
    """The main table: every pipeline a user could ship on the same queries, the paired test of each
    baseline row against the adapter's counterpart, the verdict, how each hybrid was fused, and guards."""
    if not comparison.systems:
        return []
    metric = comparison.primary_metric
    header = ["system", *comparison.systems[0].metrics, "tested against", f"delta {metric}", "p-value"]
    blocks: list[Block] = [("h2", "Pipelines on the same queries"), ("p", verdict(comparison, alpha)),
                           ("table", header, _system_cells(comparison, alpha)),
                           ("p", f"delta: the row named in 'tested against' minus this row ({_test_name(next(iter(comparison.tests.values())).stat_test) if comparison.tests else 'paired test'}); "
                                 f"▲ / ▼: significantly better / worse (p < {alpha}).")]
    if comparison.fusion:
        blocks.append(("ul", [f"{name}: {choice.reason}" for name, choice in comparison.fusion.items()]))
    if comparison.guards:
        blocks += [("h2", "Guard datasets (forgetting)"),
                   ("table", ["guard", "split", "queries", f"frozen base {metric}", f"adapter {metric}", "delta", "p-value"],
                    [[name, g.split, str(g.num_queries), f"{g.metrics[metric].baseline:.4f}",
                      f"{g.metrics[metric].candidate:.4f}",
                      f"{g.metrics[metric].delta:+.4f} {significance_mark(g.metrics[metric].delta, g.metrics[metric].p_value, alpha)}".strip(),
                      f"{g.metrics[metric].p_value:.4f}"] for name, g in comparison.guards.items()])]
    return blocks


def system_lines(comparison: Comparison, alpha: float = 0.05) -> list[str]:
    """The main table as plain text for a terminal: one line per pipeline, then the verdict."""
    metric = comparison.primary_metric
    width = max(len(row.name) for row in comparison.systems)
    lines = [f"{'system':<{width}} {metric:>9}  vs the adapter's counterpart"]
    for row in comparison.systems:
        test = comparison.tests.get(row.name)
        note = "" if test is None else (f"{test.metrics[metric].delta:+.4f} (p {test.metrics[metric].p_value:.4f}) "
                                        f"for {test.candidate_name}")
        lines.append(f"{row.name:<{width}} {row.metrics[metric]:>9.4f}  {note}")
    lines += [f"{name} (guard): {metric} {g.metrics[metric].baseline:.4f} -> {g.metrics[metric].candidate:.4f} "
              f"({g.metrics[metric].delta:+.4f})" for name, g in comparison.guards.items()]
    return lines + [verdict(comparison, alpha)]


def comparison_blocks(comparison: PairedComparison, decision: GateDecision | None, *, title: str, alpha: float,
                      primary_metric: str, details: dict[str, Any] | None = None, worst: int = 10,
                      champion: PairedComparison | None = None, pipelines: Comparison | None = None) -> list[Block]:
    """The report's content for a baseline-vs-candidate comparison (and champion-vs-candidate, if any);
    with `pipelines` (the whole evaluation), its table of every pipeline first."""
    test = _test_name(comparison.stat_test)
    blocks: list[Block] = [("h1", title), ("p", f"Split **{comparison.split}**, {comparison.num_queries} queries. "
                                                f"Baseline: **{comparison.baseline_name}**. Candidate: "
                                                f"**{comparison.candidate_name}**. Significance: {test}, alpha = {alpha}.")]
    if decision is not None:
        blocks += [("h2", f"Gate decision: {'PASSED' if decision.passed else 'FAILED'}"), ("ul", decision.reasons)]
    if pipelines is not None:
        blocks += systems_blocks(pipelines, alpha)
    blocks += [("h2", f"Metrics against {comparison.baseline_name}" if pipelines is not None and pipelines.systems
                else "Metrics"), ("table", METRIC_HEADER, _metric_rows(comparison, alpha)),
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
                            worst: int = 10, champion: PairedComparison | None = None,
                            pipelines: Comparison | None = None) -> ReportFiles:
    """Render and write the full report of a comparison (and its gate decision, if any).

    `primary_metric` (default: the decision's, else the first evaluated) is the one plotted and
    whose worst regressions are listed. `pipelines`: the whole evaluation, for the table of every pipeline.
    """
    primary = primary_metric or (decision.primary_metric if decision else next(iter(comparison.metrics)))
    blocks = comparison_blocks(comparison, decision, title=title, alpha=alpha, primary_metric=primary,
                               details=details, worst=worst, champion=champion, pipelines=pipelines)
    return write_report(out_dir, blocks, plot_query_deltas(comparison, primary))


def _test_summary(test: PairedComparison) -> dict[str, Any]:
    return {"baseline": test.baseline_name, "candidate": test.candidate_name, "num_queries": test.num_queries,
            "delta": {m: r.delta for m, r in test.metrics.items()},
            "p_value": {m: r.p_value for m, r in test.metrics.items()}}


def systems_summary(comparison: Comparison, alpha: float = 0.05) -> dict[str, Any]:
    """The pipeline rows as JSON-ready data: rows, tests, fusion choices, best row and verdict, guards."""
    if not comparison.systems and not comparison.guards:
        return {}
    best = comparison.best_system()
    return {"systems": [{"name": r.name, "role": r.role, "first_stage": r.first_stage, "metrics": r.metrics}
                        for r in comparison.systems],
            "tests": {name: _test_summary(test) for name, test in comparison.tests.items()},
            "gate_baselines": dict(comparison.roles),
            "fusion": {name: dataclasses.asdict(choice) for name, choice in comparison.fusion.items()},
            "best": best.name if best else None, "verdict": verdict(comparison, alpha),
            "guards": {name: {**_test_summary(g), "split": g.split,
                              "metrics": {m: {"base": r.baseline, "adapter": r.candidate} for m, r in g.metrics.items()}}
                       for name, g in comparison.guards.items()}}


def comparison_summary(comparison: Comparison, alpha: float = 0.05) -> dict[str, Any]:
    """Small JSON-ready metrics of a comparison (what the registry stores as metrics.json), the
    pipeline rows (BM25, hybrids, rerankers over each first stage), their tests and the guards included."""
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
    return {**summary, **systems_summary(comparison, alpha)}


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
                            primary_metric=primary_metric, details=details, worst=worst, champion=comparison.champion,
                            pipelines=comparison)
    write_json_atomic(staging / "metrics.json", comparison_summary(comparison, alpha))
    write_json_atomic(staging / "comparison.json", comparison.paired.to_dict())
    if comparison.champion is not None:
        write_json_atomic(staging / "champion_comparison.json", comparison.champion.to_dict())
    if decision is not None:
        write_json_atomic(staging / "decision.json", decision.to_dict())
    if save_runs:
        write_trec_run(comparison.baseline_run, staging / "runs" / "baseline.trec", "baseline")
        write_trec_run(comparison.adapter_run, staging / "runs" / "adapter.trec", "adapter")
        for name, run in comparison.system_runs.items():  # every pipeline row, named by a slug of its row
            slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
            write_trec_run(run, staging / "runs" / "systems" / f"{slug}.trec", slug)
    if config is not None:
        save_config(config, staging / "config.yaml")
    for name, data in (extra_files or {}).items():
        write_json_atomic(staging / name, data)
    replace_dir_atomic(staging, target)
    return ReportFiles(target / "report.md", target / "report.html", target / PLOT_FILE)
