"""Hybrid retrieval: a lexical and a dense run fused with ranx, the weight chosen on a dev split only.

Two methods, both `ranx.fuse`:
- "convex": min-max normalised scores, `w * lexical + (1 - w) * dense`; `w` is chosen by
  `ranx.optimize_fusion` (a grid of step 0.1) on the dev split's queries and qrels, never on the
  split the result is reported on. Without a dev split, `w` = 0.5 (equal weights) and the
  choice says so.
- "rrf": reciprocal rank fusion, `1 / (k + rank)` summed, k = 60 (Cormack et al.); nothing to choose.

    choice = choose_fusion("convex", dev_qrels, [bm25_dev, dense_dev], "ndcg@10", split="dev")
    hybrid = fuse_runs([bm25_test, dense_test], choice)

`choose_fusion` sees only what it is given: the caller passes the dev split's qrels and runs,
and the result (`FusionChoice`, plain data) records the split it was chosen on and why.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass

from retrieval_lora.data.beir import Qrels
from retrieval_lora.errors import ConfigError
from retrieval_lora.evaluation.runs import Run, ranked
from retrieval_lora.evaluation.settings import FUSION_METHODS
RRF_K = 60
DEFAULT_WEIGHT = 0.5  # the lexical run's weight when no dev split can choose it
WEIGHT_STEP = 0.1
_EMPTY = "__no_result__"  # ranx needs a document per query; removed from fused runs


@dataclass
class FusionChoice:
    """How two runs are fused: `weights` (lexical, dense) for "convex", `rrf_k` for "rrf"; `chosen_on`
    names the split the weights were chosen on (None: not chosen, see `reason`)."""

    method: str
    weights: tuple[float, float] | None
    chosen_on: str | None
    reason: str
    rrf_k: int = RRF_K

    def label(self) -> str:
        """A short name for tables: "convex, w_bm25 = 0.3" or "RRF, k = 60"."""
        if self.method == "rrf":
            return f"RRF, k = {self.rrf_k}"
        return f"convex, w_bm25 = {self.weights[0]:.1f}"


@contextlib.contextmanager
def _quiet_numba():
    """ranx's min-max normalisation makes numba warn about a uint64 -> int64 cast of a loop index: noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*unsafe cast from uint64 to int64")
        yield


def check_fusion_methods(methods: tuple[str, ...]) -> None:
    unknown = [m for m in methods if m not in FUSION_METHODS]
    if unknown:
        raise ConfigError(f"fusion method(s) {', '.join(map(repr, unknown))}: must be among {', '.join(FUSION_METHODS)}")


def _ranx_runs(runs: list[Run], query_ids: list[str], *, rank_values: bool):
    """ranx Runs over exactly `query_ids` (an empty or missing ranking gets a placeholder). With
    `rank_values`, scores become descending ranks in `ranked` order, so ties order the same everywhere."""
    from ranx import Run as RanxRun

    def ranking(run: Run, query_id: str) -> dict[str, float]:
        found = run.get(query_id) or {_EMPTY: 0.0}
        if rank_values:
            return {doc: float(len(found) - i) for i, (doc, _) in enumerate(ranked(found))}
        return {doc: float(score) for doc, score in found.items()}

    return [RanxRun({q: ranking(run, q) for q in query_ids}, name=f"run{i}") for i, run in enumerate(runs)]


def choose_fusion(method: str, qrels: Qrels | None, runs: list[Run] | None, metric: str, *, split: str | None,
                  unavailable: str = "the dataset has no dev split") -> FusionChoice:
    """The fusion of a lexical and a dense run, its weight chosen on `qrels` and `runs` (one split's).

    Args:
        method: "convex" or "rrf".
        qrels, runs: the dev split's qrels and its [lexical, dense] runs; None when there is none
            (then the convex weight is DEFAULT_WEIGHT, and `unavailable` says why).
        metric: the ranx metric the weight maximises (the gate's primary metric).
        split: the name of the split `qrels` belongs to, recorded in the choice.

    Raises:
        ConfigError: unknown method.
    """
    check_fusion_methods((method,))
    if method == "rrf":
        return FusionChoice("rrf", None, None, f"reciprocal rank fusion with the usual k = {RRF_K}: no weight to choose")
    if not qrels or not runs:
        return FusionChoice("convex", (DEFAULT_WEIGHT, 1 - DEFAULT_WEIGHT), None,
                            f"equal weights (w_bm25 = {DEFAULT_WEIGHT}): {unavailable} to choose the weight on, "
                            "and the evaluated split is never used for it")
    from ranx import Qrels as RanxQrels
    from ranx import optimize_fusion

    query_ids = sorted(qrels)
    with contextlib.redirect_stdout(io.StringIO()), _quiet_numba():  # ranx prints a progress bar
        best = optimize_fusion(RanxQrels({q: qrels[q] for q in query_ids}), _ranx_runs(runs, query_ids, rank_values=False),
                               norm="min-max", method="wsum", metric=metric, step=WEIGHT_STEP, show_progress=False)
    lexical = round(float(best["weights"][0]), 3)
    return FusionChoice("convex", (lexical, round(1 - lexical, 3)), split,
                        f"w_bm25 = {lexical:.1f} maximises {metric} on the {len(query_ids)} queries of split "
                        f"{split!r} (ranx optimize_fusion, step {WEIGHT_STEP})")


def fuse_runs(runs: list[Run], choice: FusionChoice, k: int | None = None) -> Run:
    """`runs` ([lexical, dense]) fused as `choice` says, over the union of their queries; the top `k`
    per query if given (default: everything either run retrieved)."""
    from ranx import fuse

    query_ids = sorted(set().union(*runs))
    with _quiet_numba():
        if choice.method == "rrf":
            fused = fuse(_ranx_runs(runs, query_ids, rank_values=True), norm=None, method="rrf",
                         params={"k": choice.rrf_k})
        else:
            fused = fuse(_ranx_runs(runs, query_ids, rank_values=False), norm="min-max", method="wsum",
                         params={"weights": list(choice.weights)})
    result: Run = {}
    for query_id in query_ids:
        ranking = {str(doc): float(score) for doc, score in fused.run[query_id].items() if doc != _EMPTY}
        result[query_id] = dict(ranked(ranking)[:k] if k else ranked(ranking))
    return result
