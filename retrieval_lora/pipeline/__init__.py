"""The pipeline, written once: data -> rows -> train -> evaluate -> decide -> publish.

`config` holds the combined settings (`SpecializeConfig`, one section per stage, light to
import); `verbs` the steps over plain references. `python -m retrieval_lora.train` runs the verbs
in order, the Prefect flow (`flows/specialize.py`) wraps each in a task, and the benchmarks in
`evals/` call them too.

    from retrieval_lora.pipeline import SpecializeConfig, load_data, build_rows, train, Candidate, evaluate_candidate

    config = SpecializeConfig()
    dataset = load_data(config.data)
    rows = build_rows(config.train, config.data, dataset, "runs/embedder/rows")
    result = train(config.train, dataset, rows, "runs/embedder")
    comparison = evaluate_candidate(Candidate.trained(config.train, result.adapter_dir), dataset,
                                    config.evaluation, config.data, config.gate.primary_metric)
"""

from retrieval_lora.lazy import lazy_exports
from retrieval_lora.pipeline.config import (
    DEFAULT_CACHE_DIR, DataConfig, EvaluationConfig, PublishConfig, SpecializeConfig, check_gate_metric, check_splits, load_data,
)

__getattr__ = lazy_exports(__name__, {name: ".verbs" for name in (
    "Candidate", "Published", "Rows", "build_rows", "comparison_summary", "decide", "default_name", "describe_rows",
    "dev_first_stage",
    "format_outcome",
    "evaluate_base", "evaluate_candidate", "find_champion", "load_candidate", "publish", "report_details", "train", "write_report",
)})

__all__ = ["DEFAULT_CACHE_DIR", "DataConfig", "EvaluationConfig", "PublishConfig", "SpecializeConfig", "check_gate_metric", "check_splits", "load_data"]  # and the lazily loaded names above
