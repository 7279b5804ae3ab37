"""The promotion gate: may this candidate replace its baseline? A decision with its reasons in words.

A candidate passes only when every check passes:
1. its primary metric (default nDCG@10) gains at least `min_gain` over the baseline;
2. that gain is statistically significant (paired test p-value below `alpha`), unless
   `require_significance` is off;
3. no other evaluated metric is significantly worse (p < `alpha` with a negative delta);
4. at most `max_regressed_share` of the queries score lower on the primary metric;
5. when the name already has a promoted version (the champion) and `against_champion` is on,
   the candidate also gains at least `min_gain` over the champion on the same queries, with no
   other metric significantly worse (significance of that gain is not required: a retrained
   adapter that is as good within noise stays a challenger, the champion keeps serving);
6. for each extra baseline in `must_beat`: `bm25` (the adapter against BM25 alone) and `hybrid`
   (BM25 + adapter against BM25 + frozen base, fused the same way; for a reranker, the adapter
   over that hybrid first stage against the better of the hybrid alone and the frozen reranker
   over it): a gain of at least `min_gain`,
   significant when `require_significance` is on;
7. on each guard dataset (`evaluation.guard_data`), the primary metric drops by at most
   `guard_max_drop` from the frozen base to the adapter (the adapter must not forget).

The baseline is whatever `evaluation.compare_with_base` chose: for an embedder the frozen
base, for a reranker the better of the first stage alone and the frozen base reranker.

Example:
    decision = decide(comparison.paired, GatePolicy(min_gain=0.01))
    if not decision.passed:
        print("\\n".join(decision.reasons))
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from retrieval_lora.config import field
from retrieval_lora.errors import ConfigError

BASELINE_NAMES = ("base", "bm25", "hybrid")
BASELINE_LABELS = {"bm25": "BM25", "hybrid": "the BM25 + frozen base hybrid"}

if TYPE_CHECKING:  # only annotations: the policy imports without ranx, so flags are checked in a second
    from retrieval_lora.evaluation import MetricResult, PairedComparison


@dataclass
class GatePolicy:
    """When a candidate adapter may be promoted. Every knob has a default that suits small test splits."""

    primary_metric: str = field("ndcg@10", "metric the candidate must improve (a ranx name among the evaluated metrics)")
    min_gain: float = field(0.005, "smallest absolute gain on the primary metric worth promoting (0.005 = half a point)")
    alpha: float = field(0.05, "significance level of the paired test: p-values below it count as real differences")
    require_significance: bool = field(True, "also require the primary gain to be significant at the level alpha")
    max_regressed_share: float = field(0.3, "largest share of queries allowed to score lower on the primary metric")
    against_champion: bool = field(True, "when the name already has a promoted version (the champion), the candidate "
                                         "must also beat it by min_gain on the primary metric with no metric "
                                         "significantly worse; off: judge against the frozen base only")
    must_beat: str = field("base", "comma-separated baselines the candidate must beat by min_gain (significantly, "
                                   "if require_significance): base (the frozen base, always judged), bm25 (the "
                                   "adapter vs BM25 alone), hybrid (BM25 + adapter vs BM25 + frozen base)")
    guard_max_drop: float = field(0.01, "largest drop of the primary metric allowed on each guard dataset "
                                        "(--eval-guard-data), frozen base -> adapter (0.01 = one point)")

    def __post_init__(self) -> None:
        problems = []
        if not 0 < self.alpha < 1:
            problems.append(f"alpha={self.alpha}: must be in (0, 1), typically 0.05 or 0.01")
        if not 0 <= self.max_regressed_share <= 1:
            problems.append(f"max_regressed_share={self.max_regressed_share}: must be in [0, 1]")
        if self.min_gain < 0:
            problems.append(f"min_gain={self.min_gain}: must be >= 0 (a candidate must not be worse)")
        if not self.primary_metric.strip():
            problems.append("primary_metric is empty: give a ranx metric name such as ndcg@10")
        unknown = [name for name in self.required_baselines if name not in BASELINE_NAMES]
        if unknown:
            problems.append(f"must_beat={self.must_beat!r}: {', '.join(unknown)} unknown; use {', '.join(BASELINE_NAMES)}")
        if self.guard_max_drop < 0:
            problems.append(f"guard_max_drop={self.guard_max_drop}: must be >= 0 (0: no drop at all on a guard)")
        if problems:
            raise ConfigError("invalid gate policy: " + "; ".join(problems))

    @property
    def required_baselines(self) -> tuple[str, ...]:
        """The extra baselines of `must_beat` (the frozen base is always judged)."""
        return tuple(dict.fromkeys(n.strip() for n in self.must_beat.split(",") if n.strip() and n.strip() != "base"))


@dataclass
class GateDecision:
    """The verdict: `passed`, and one sentence per check (failures first) saying why."""

    passed: bool
    reasons: list[str]
    primary_metric: str
    baseline_name: str
    baseline: float
    candidate: float
    gain: float
    p_value: float
    regressed_share: float
    policy: dict[str, Any]
    failed_checks: list[str]
    champion: str | None = None  # the promoted version the candidate was judged against, if any
    champion_value: float | None = None  # the champion's primary metric on the same queries

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line: PASSED/FAILED and the first reason."""
        return f"{'PASSED' if self.passed else 'FAILED'}: {self.reasons[0]}"


def _fmt_p(p_value: float) -> str:
    return "p < 0.0001" if p_value < 1e-4 else f"p = {p_value:.4f}"


def _gain_check(result: MetricResult, policy: GatePolicy) -> tuple[bool, str]:
    label = result.metric
    text = f"{label} went from {result.baseline:.4f} to {result.candidate:.4f} ({result.delta:+.4f})"
    if result.delta < 0:
        return False, f"the candidate is worse: {text}"
    if result.delta < policy.min_gain:
        return False, f"the gain is too small: {text}, but at least {policy.min_gain:+.4f} is required"
    return True, f"{text}, at least {policy.min_gain:+.4f} required"


def _significance_check(result: MetricResult, policy: GatePolicy, stat_test: str) -> tuple[bool, str]:
    test = f"paired {'t-test' if stat_test == 'student' else stat_test + ' test'}"
    significant = result.delta > 0 and result.significant(policy.alpha)
    if not policy.require_significance and not significant:
        return True, (f"the {result.metric} gain is not significant ({test}, {_fmt_p(result.p_value)}), "
                      "which this policy allows (require_significance is off)")
    if result.delta <= 0:
        return False, f"there is no {result.metric} gain to be significant ({test}, {_fmt_p(result.p_value)})"
    if significant:
        return True, f"the {result.metric} gain is significant ({test}, {_fmt_p(result.p_value)} < {policy.alpha})"
    return False, (f"the {result.metric} gain is not significant ({test}, {_fmt_p(result.p_value)} >= "
                   f"{policy.alpha}): it may be noise on these {result.wins + result.losses + result.ties} queries")


def _other_metrics_check(comparison: PairedComparison, policy: GatePolicy) -> tuple[bool, str]:
    worse = [r for name, r in comparison.metrics.items()
             if name != policy.primary_metric and r.delta < 0 and r.significant(policy.alpha)]
    if worse:
        listed = "; ".join(f"{r.metric} {r.baseline:.4f} -> {r.candidate:.4f} ({r.delta:+.4f}, {_fmt_p(r.p_value)})"
                           for r in worse)
        return False, f"another metric is significantly worse: {listed}"
    others = [name for name in comparison.metrics if name != policy.primary_metric]
    return True, f"no other metric is significantly worse ({', '.join(others) or 'none evaluated'})"


def _regression_share_check(comparison: PairedComparison, policy: GatePolicy) -> tuple[bool, str]:
    result = comparison.metrics[policy.primary_metric]
    share = comparison.regressed_share(policy.primary_metric)
    counts = f"{result.losses} of {result.wins + result.losses + result.ties} queries ({share:.0%}) score lower " \
             f"on {result.metric} ({result.wins} higher, {result.ties} unchanged)"
    if share > policy.max_regressed_share:
        return False, f"too many queries regress: {counts}; at most {policy.max_regressed_share:.0%} allowed"
    return True, f"{counts}; at most {policy.max_regressed_share:.0%} allowed"


def _champion_checks(champion: PairedComparison, policy: GatePolicy) -> dict[str, tuple[bool, str]]:
    """The candidate against the promoted champion: a gain of min_gain, and nothing significantly worse."""
    result = champion.metrics[policy.primary_metric]
    ok, text = _gain_check(result, policy)
    if ok and result.delta <= 0:  # a challenger must beat the champion, not tie it (ties keep the champion serving)
        ok, text = False, f"no gain: {text}"
    worse_ok, worse_text = _other_metrics_check(champion, policy)
    name = champion.baseline_name
    return {"champion_gain": (ok, f"against the champion {name}: {text}"),
            "champion_regression": (worse_ok, f"against the champion {name}: {worse_text}")}


def _baseline_checks(role: str, comparison: PairedComparison | None, policy: GatePolicy) -> dict[str, tuple[bool, str]]:
    """The candidate against an extra baseline of `must_beat`: the gain, and its significance."""
    label = BASELINE_LABELS[role]
    if comparison is None:
        raise ConfigError(f"the gate's must_beat names {role}, but the evaluation has no row for {label}; evaluate "
                          "with BM25 on (--eval-bm25) and a fusion method (--eval-fusion)")
    result = comparison.metrics[policy.primary_metric]
    ok, text = _gain_check(result, policy)
    significant_ok, significant_text = _significance_check(result, policy, comparison.stat_test)
    who = f"against {label} ({comparison.baseline_name} vs {comparison.candidate_name})"
    return {f"{role}_gain": (ok, f"{who}: {text}"), f"{role}_significance": (significant_ok, f"{who}: {significant_text}")}


def _guard_check(name: str, guard: PairedComparison, policy: GatePolicy) -> tuple[bool, str]:
    result = guard.metrics[policy.primary_metric]
    drop = -result.delta
    text = (f"on the guard dataset {name} ({guard.split}, {guard.num_queries} queries) {result.metric} went from "
            f"{result.baseline:.4f} (frozen base) to {result.candidate:.4f} (adapter), {result.delta:+.4f} "
            f"({_fmt_p(result.p_value)})")
    if drop > policy.guard_max_drop:
        return False, (f"the adapter forgets: {text}, a drop larger than the {policy.guard_max_drop:.4f} allowed "
                       "(guard_max_drop)")
    return True, f"{text}; a drop of at most {policy.guard_max_drop:.4f} is allowed"


def decide(comparison: PairedComparison, policy: GatePolicy | None = None,
           champion: PairedComparison | None = None, *, baselines: dict[str, PairedComparison] | None = None,
           guards: dict[str, PairedComparison] | None = None) -> GateDecision:
    """Apply `policy` to a baseline-vs-candidate comparison (and to champion-vs-candidate, if given).

    Args:
        comparison: from `evaluation.compare_runs` or `compare_with_base(...).paired`.
        champion: the promoted version (baseline) against the candidate on the same queries; its
            checks apply when `policy.against_champion` is on. None: the first version of a name.
        baselines: the extra baselines ("bm25", "hybrid") against their candidate, e.g.
            `{role: comparison.tests[key] for role, key in comparison.roles.items()}`; those named in
            `policy.must_beat` are judged.
        guards: guard dataset name -> frozen base (baseline) vs adapter on it; each is judged.

    Returns:
        GateDecision with `passed` and a reason per check, failed checks first.

    Raises:
        ConfigError: the policy's primary metric was not evaluated, or a required baseline is missing.
    """
    policy = policy or GatePolicy()
    if policy.primary_metric not in comparison.metrics:
        raise ConfigError(f"gate primary_metric={policy.primary_metric!r} was not evaluated; evaluated metrics: "
                          f"{', '.join(comparison.metrics)}. Add it to --metrics or change --primary-metric")
    primary = comparison.metrics[policy.primary_metric]
    checks = {
        "gain": _gain_check(primary, policy),
        "significance": _significance_check(primary, policy, comparison.stat_test),
        "other_metrics": _other_metrics_check(comparison, policy),
        "regressed_share": _regression_share_check(comparison, policy),
    }
    judged_champion = champion if policy.against_champion else None
    if judged_champion is not None:
        checks.update(_champion_checks(judged_champion, policy))
    for role in policy.required_baselines:
        checks.update(_baseline_checks(role, (baselines or {}).get(role), policy))
    for name, guard in (guards or {}).items():
        checks[f"guard:{name}"] = _guard_check(name, guard, policy)
    failed = [name for name, (ok, _) in checks.items() if not ok]
    reasons = [checks[name][1] for name in failed] + [text for ok, text in checks.values() if ok]
    return GateDecision(passed=not failed, reasons=reasons, primary_metric=policy.primary_metric,
                        baseline_name=comparison.baseline_name, baseline=primary.baseline, candidate=primary.candidate,
                        gain=primary.delta, p_value=primary.p_value,
                        regressed_share=comparison.regressed_share(policy.primary_metric),
                        policy=asdict(policy), failed_checks=failed,
                        champion=judged_champion.baseline_name if judged_champion else None,
                        champion_value=judged_champion.metrics[policy.primary_metric].baseline if judged_champion else None)
