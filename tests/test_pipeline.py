"""One pipeline, three shells: the train CLI and the Prefect flow run the same verbs and agree;
a QLoRA adapter scores the same through the flow's evaluation, `evaluate` and the server's engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import write_learnable
from retrieval_lora.data import load_beir, load_pairs, pairs_fingerprint
from retrieval_lora.pipeline import DataConfig, EvaluationConfig, SpecializeConfig
from retrieval_lora.registry import DEFAULT_REGISTRY, REGISTRY_ENV, registry_root

pytestmark = pytest.mark.slow

TRAIN = {"max_seq_length": 32, "batch_size": 4, "epochs": 2, "lr": 5e-3, "dev_split": "", "checkpoint_steps": 100,
         "lora": {"rank": 8, "alpha": 16}}
LENIENT_GATE = {"min_gain": 0.0, "require_significance": False, "max_regressed_share": 1.0}


@pytest.fixture
def learnable(tmp_path: Path) -> Path:
    return write_learnable(tmp_path / "learnable", splits=("train", "test"))


def _cli_flags(data: Path, root: Path) -> list[str]:
    lora = TRAIN["lora"]
    flags = ["--data", str(data), "--cache-dir", str(root / "cache"), "--output", str(root / "runs"),
             "--eval-split", "train", "--eval-top-k", "8", "--lora-rank", str(lora["rank"]),
             "--lora-alpha", str(lora["alpha"]), "--registry", str(root / "cli-registry"), "--name", "same",
             "--no-gate-require-significance", "--gate-min-gain", "0", "--gate-max-regressed-share", "1"]
    for key, value in TRAIN.items():
        if key != "lora":
            flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


def test_train_cli_and_flow_give_the_same_rows_adapter_decision_and_metrics(prefect_api: str, learnable: Path,
                                                                             tmp_path: Path) -> None:
    from flows.specialize import specialize
    from retrieval_lora.train import main as train_main

    assert train_main(_cli_flags(learnable, tmp_path)) == 0
    cli_dir = tmp_path / "runs" / "embedder"
    outcome = specialize(data={"path": str(learnable), "cache_dir": str(tmp_path / "cache")}, train=TRAIN,
                         evaluation={"split": "train", "top_k": 8}, gate=LENIENT_GATE,
                         publish={"name": "same", "registry": str(tmp_path / "flow-registry")},
                         workdir=str(tmp_path / "work"))
    flow_rows = next((tmp_path / "work" / "rows").glob("*/rows"))
    assert pairs_fingerprint(load_pairs(flow_rows)) == pairs_fingerprint(load_pairs(cli_dir / "mining" / "rows"))
    cli_weights = load_file(str(cli_dir / "adapter" / "adapter_model.safetensors"))
    flow_weights = load_file(str(next((tmp_path / "work" / "train").glob("*/adapter")) / "adapter_model.safetensors"))
    assert cli_weights.keys() == flow_weights.keys()
    assert all(torch.allclose(cli_weights[k], flow_weights[k], atol=1e-6) for k in cli_weights)
    cli_metrics = json.loads((cli_dir / "metrics.json").read_text())
    assert outcome.metrics["adapter"] == pytest.approx(cli_metrics["adapter"], abs=1e-9)
    assert outcome.metrics["baseline"] == pytest.approx(cli_metrics["baseline"], abs=1e-9)
    assert outcome.reasons == cli_metrics["decision"]["reasons"] and outcome.status == "promoted"


def test_a_qlora_adapter_scores_the_same_in_the_flow_evaluate_and_the_server_engine(learnable: Path,
                                                                                    tmp_path: Path) -> None:
    from flows import tasks
    from retrieval_lora import pipeline
    from retrieval_lora.data import dataset_fingerprint
    from retrieval_lora.evaluate import main as evaluate_main
    from retrieval_lora.evaluation import score_run, search
    from retrieval_lora.serving import Embedder
    from retrieval_lora.training import TrainConfig

    dataset = load_beir(learnable)
    train = TrainConfig(qlora=True, **{**TRAIN, "lora": TRAIN["lora"]})
    rows = pipeline.build_rows(train, DataConfig(cache_dir=""), dataset, tmp_path / "rows")
    adapter = pipeline.train(train, dataset, rows, tmp_path / "run").adapter_dir
    evaluation = EvaluationConfig(split="train", top_k=8)
    flow_comparison = tasks.evaluate.fn("k", DataConfig(), str(dataset.root), dataset_fingerprint(dataset),
                                        str(adapter), train, evaluation, "ndcg@10")
    assert evaluate_main(["--data", str(learnable), "--adapter", str(adapter), "--split", "train", "--top-k", "8",
                          "--max-seq-length", "32", "--output", str(tmp_path / "eval")]) == 0
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())["adapter"]
    assert flow_comparison.adapter == pytest.approx(evaluated, abs=1e-9)
    served = Embedder(adapter_dir=adapter, max_seq_length=32)  # the server's engine: float base + adapter
    ids = sorted(dataset.corpus)
    docs = served.encode([dataset.corpus[d].full_text for d in ids])
    queries = dataset.split_queries("train")
    run = search(ids, np.asarray(docs, dtype=np.float32), list(queries),
                 np.asarray(served.encode(list(queries.values())), dtype=np.float32), 8)
    assert score_run(dataset.split_qrels("train"), run) == pytest.approx(evaluated, abs=1e-6)


def test_every_entry_point_resolves_the_same_defaults(monkeypatch, tmp_path: Path) -> None:
    import dataclasses

    from flows.specialize import specialize
    from retrieval_lora.evaluate import EvaluateCommand
    from retrieval_lora.mine import MineCommand
    from retrieval_lora.serving.config import ServeConfig
    from retrieval_lora.train import parse

    defaults = SpecializeConfig()
    assert parse([]) == defaults  # the train command's flags add nothing of their own
    flow = specialize.validate_parameters({})
    for section in ("data", "train", "evaluation", "gate", "publish"):
        assert flow[section] == getattr(defaults, section), section
    assert EvaluateCommand().evaluation == defaults.evaluation and EvaluateCommand().gate == defaults.gate
    assert MineCommand().max_seq_length == defaults.train.max_seq_length
    assert MineCommand().mining.cache_dir == defaults.data.cache_dir
    monkeypatch.setenv(REGISTRY_ENV, str(tmp_path / "shared-registry"))
    assert registry_root(defaults.publish.registry) == tmp_path / "shared-registry"
    assert registry_root(flow["publish"].registry) == tmp_path / "shared-registry"
    assert ServeConfig().registry_dir == tmp_path / "shared-registry"
    monkeypatch.delenv(REGISTRY_ENV)
    assert registry_root(None) == Path(DEFAULT_REGISTRY)
    assert not [f.name for f in dataclasses.fields(EvaluateCommand) if f.name in ("split", "top_k")]
