"""Registry: versions, atomic promotion (crash injected), concurrent promotions, rollback, CLI."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval_lora.errors import AdapterError, RegistryError
from retrieval_lora.models import (
    METADATA_FILE, AdapterMetadata, LoraSettings, attach_lora, base_fingerprint, load_adapter, load_base,
    save_adapter, transformer_of,
)
from retrieval_lora.registry import DEFAULT_REGISTRY, REGISTRY_ENV, Registry, registry_root
from retrieval_lora.registry.cli import main as registry_main

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["which animal has a trunk", "bees make honey"]


def _adapter(base_path: str, folder: Path, seed: int):
    """A real saved embedder adapter whose LoRA weights are random (as if trained)."""
    model = load_base("embedder", base_path, max_seq_length=32)
    attach_lora(model, "embedder", LoraSettings(rank=2))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in transformer_of(model).parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    model.eval()
    save_adapter(model, folder, AdapterMetadata("embedder", "packaged", base_fingerprint(model), "data-fp"))
    return model.encode(TEXTS, convert_to_numpy=True)


@pytest.fixture(scope="session")
def adapters(tmp_path_factory, base_path: str) -> dict:
    """Two real adapters (a, b) with the embeddings they produce."""
    root = tmp_path_factory.mktemp("adapters")
    return {key: (root / key, _adapter(base_path, root / key, seed)) for key, seed in (("a", 1), ("b", 2))}


@pytest.fixture
def registry(tmp_path: Path, adapters: dict) -> Registry:
    """A registry holding demo@1 (adapter a), demo@2 (b), demo@3 (a)."""
    registry = Registry(tmp_path / "reg")
    for key in ("a", "b", "a"):
        registry.register("demo", adapters[key][0], metrics={"ndcg@10": 0.5}, decision={"passed": True, "reasons": []})
    return registry


def test_register_writes_complete_numbered_versions(registry: Registry, tmp_path: Path) -> None:
    assert registry.names() == ["demo"]
    versions = registry.versions("demo")
    assert [v.version for v in versions] == [1, 2, 3]
    first = versions[0]
    assert sorted(p.name for p in first.path.iterdir()) == ["adapter", "decision.json", "manifest.json", "metrics.json"]
    manifest = first.manifest()
    assert manifest["kind"] == "adapter-version" and manifest["name"] == "demo" and manifest["version"] == 1
    assert manifest["dataset_fingerprint"] == "data-fp" and "libraries" in manifest and "git_commit" in manifest
    assert first.metadata().task == "embedder" and first.metrics() == {"ndcg@10": 0.5}
    assert not [p for p in (tmp_path / "reg" / "demo" / "versions").iterdir() if p.name.startswith(".")]
    assert registry.promoted("demo") is None and registry.history("demo") == []


def test_promoted_adapter_loads_and_reproduces_its_embeddings(registry: Registry, adapters: dict,
                                                              base_path: str) -> None:
    registry.promote("demo", 2)
    version = registry.resolve("demo")
    assert version.version == 2 and registry.resolve("demo@1").version == 1 and registry.resolve("demo@latest").version == 3
    model = load_base("embedder", base_path, max_seq_length=32)
    load_adapter(model, version.adapter_dir, "embedder")
    np.testing.assert_allclose(model.encode(TEXTS, convert_to_numpy=True), adapters["b"][1], atol=1e-5)


def test_rollback_restores_the_previous_adapter(registry: Registry) -> None:
    registry.promote("demo", 1)
    registry.promote("demo", 3)
    registry.promote("demo", 2, reason="try b")
    assert registry.rollback("demo").version == 3 and registry.promoted("demo").version == 3
    assert registry.rollback("demo", reason="bad").version == 1
    with pytest.raises(RegistryError, match="no earlier version"):
        registry.rollback("demo")
    history = registry.history("demo")
    assert [(e["action"], e["version"], e["previous"]) for e in history] == [
        ("promote", 1, None), ("promote", 3, 1), ("promote", 2, 3), ("rollback", 3, 2), ("rollback", 1, 3)]
    assert history[2]["reason"] == "try b" and [e["seq"] for e in history] == [1, 2, 3, 4, 5]


def test_promoting_the_promoted_version_changes_nothing(registry: Registry) -> None:
    registry.promote("demo", 1)
    registry.promote("demo", 1)
    assert len(registry.history("demo")) == 1


def test_failed_gate_refuses_promotion_unless_forced(tmp_path: Path, adapters: dict) -> None:
    registry = Registry(tmp_path / "reg")
    registry.register("demo", adapters["a"][0], decision={"passed": False, "reasons": ["nDCG@10 is worse"]})
    with pytest.raises(RegistryError, match="failed its promotion gate.*nDCG@10 is worse"):
        registry.promote("demo", 1)
    assert registry.promoted("demo") is None
    registry.promote("demo", 1, force=True)
    entry = registry.history("demo")[0]
    assert (entry["reason"], entry["forced"], entry["gate"]) == ("forced (gate: failed)", True, "failed")


def test_a_version_without_a_passed_gate_needs_force_and_is_marked(tmp_path: Path, adapters: dict) -> None:
    registry = Registry(tmp_path / "reg")
    registry.register("demo", adapters["a"][0])  # no decision recorded at all
    registry.register("demo", adapters["b"][0], decision={"passed": True, "reasons": []})
    with pytest.raises(RegistryError, match="demo@1 has no passed gate.*--force"):
        registry.promote("demo", 1)
    registry.promote("demo", 2)
    registry.promote("demo", 1, force=True, reason="hotfix")
    first, second = registry.history("demo")
    assert "forced" not in first and "gate" not in first
    assert (second["forced"], second["gate"], second["reason"]) == (True, "none", "hotfix")


def test_cli_register_checks_the_folder_and_records_that_no_gate_ran(tmp_path: Path, adapters: dict,
                                                                     base_path: str, capsys) -> None:
    root = ["--registry", str(tmp_path / "reg")]
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"ndcg@10": 0.61}))
    assert registry_main(root + ["register", "hand", str(adapters["a"][0]), "--base", base_path,
                                 "--metrics", str(metrics)]) == 0
    printed = capsys.readouterr().out
    assert "registered hand@1 (embedder" in printed and "promote hand 1 --force" in printed
    version = Registry(tmp_path / "reg").version("hand", 1)
    assert version.decision()["passed"] is None and version.decision()["gate"] == "none"
    assert version.metrics() == {"ndcg@10": 0.61}
    with pytest.raises(RegistryError, match="hand@1 has no passed gate"):
        registry_main(root + ["promote", "hand", "1"])
    assert registry_main(root + ["promote", "hand", "1", "--force"]) == 0
    assert registry_main(root + ["show", "hand"]) == 0
    shown = capsys.readouterr().out
    assert "gate: NONE (no gate ran)" in shown and "forced=True gate=none" in shown
    # the checks: an adapter for another base, a damaged folder, a task no one knows
    foreign = tmp_path / "foreign"
    shutil.copytree(adapters["a"][0], foreign)
    meta = json.loads((foreign / METADATA_FILE).read_text())
    (foreign / METADATA_FILE).write_text(json.dumps({**meta, "base_fingerprint": "0123456789abcdef"}))
    with pytest.raises(AdapterError, match="fingerprint 0123456789abcdef.*load the base it was trained on"):
        registry_main(root + ["register", "hand", str(foreign), "--base", base_path])
    (foreign / METADATA_FILE).write_text(json.dumps({**meta, "task": "classifier"}))
    with pytest.raises(AdapterError, match="task 'classifier' is not one of embedder, reranker"):
        registry_main(root + ["register", "hand", str(foreign), "--base", base_path])
    (foreign / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="adapter_model.safetensors is missing"):
        registry_main(root + ["register", "hand", str(foreign), "--base", base_path])
    assert [v.version for v in Registry(tmp_path / "reg").versions("hand")] == [1]  # nothing half-registered


def _crashing_child(root: str, action: str, target: str, argument: str) -> None:
    """Runs in a forked child: dies (os._exit, no cleanup, like kill -9) at the moment the registry
    renames a file or folder ending in `target` into place, i.e. after writing, before switching."""
    real = {"replace": os.replace, "rename": os.rename}

    def crash_at(kind: str):
        def switch(src, dst, *args, **kwargs):
            if str(dst).endswith(target):
                os._exit(9)
            return real[kind](src, dst, *args, **kwargs)
        return switch

    os.replace, os.rename = crash_at("replace"), crash_at("rename")
    registry = Registry(root)
    if action == "promote":
        registry.promote("demo", int(argument))
    else:
        registry.register("demo", Path(argument))
    os._exit(0)


def _crash(root: Path, action: str, target: str, argument: str) -> int:
    child = multiprocessing.get_context("fork").Process(target=_crashing_child, args=(str(root), action, target, argument))
    child.start()
    child.join(120)
    return child.exitcode


@pytest.mark.parametrize("target", ["promoted.json", "history.json"])
def test_crash_between_write_and_switch_keeps_old_pointer(registry: Registry, target: str) -> None:
    registry.promote("demo", 1)
    assert _crash(registry.root, "promote", target, "2") == 9
    assert list((registry.root / "demo").glob(f".{target}.tmp-*")), "the crash left the written-but-unswitched file"
    assert registry.promoted("demo").version == 1 and registry.resolve("demo").adapter_dir.is_dir()
    assert [e["version"] for e in registry.history("demo")] == [1]
    registry.promote("demo", 3)  # the lock died with the crashed process; the registry works on
    assert registry.promoted("demo").version == 3 and [e["seq"] for e in registry.history("demo")] == [1, 2]


def test_crash_after_pointer_written_before_history_is_reflected_consistently(registry: Registry) -> None:
    """History is written first: a crash before the pointer switch leaves a history entry that
    readers ignore (its seq is ahead of the pointer) and the next change overwrites."""
    registry.promote("demo", 1)
    assert _crash(registry.root, "promote", "promoted.json", "2") == 9
    raw = json.loads((registry.root / "demo" / "history.json").read_text())
    assert len(raw) == 2 and len(registry.history("demo")) == 1
    registry.promote("demo", 3)
    assert [(e["seq"], e["version"]) for e in registry.history("demo")] == [(1, 1), (2, 3)]


def test_crash_while_registering_leaves_no_visible_version(registry: Registry, adapters: dict) -> None:
    assert _crash(registry.root, "register", "/versions/4", str(adapters["b"][0])) == 9
    assert [v.version for v in registry.versions("demo")] == [1, 2, 3]
    assert registry.register("demo", adapters["b"][0]).version == 4


def _promote_many(root: str, versions: list[int]) -> None:
    registry = Registry(root)
    for version in versions:
        registry.promote("demo", version)


def test_concurrent_promotions_leave_one_consistent_pointer(registry: Registry) -> None:
    context = multiprocessing.get_context("fork")  # promotion never touches torch, so fork is safe here
    plans = [[1, 2, 3] * 4, [3, 2, 1] * 4, [2, 1, 3, 1] * 3]
    workers = [context.Process(target=_promote_many, args=(str(registry.root), plan)) for plan in plans]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    pointer = json.loads((registry.root / "demo" / "promoted.json").read_text())
    history = registry.history("demo")
    assert pointer["version"] == registry.promoted("demo").version == history[-1]["version"]
    assert [e["seq"] for e in history] == list(range(1, len(history) + 1)) == list(range(1, pointer["seq"] + 1))
    # every entry's "previous" is the version the entry before it switched to: no lost update
    assert all(cur["previous"] == prev["version"] for prev, cur in zip(history, history[1:]))
    assert pointer["stack"] == [e["version"] for e in history]
    assert not list((registry.root / "demo").glob(".*.tmp-*"))


def test_bad_names_versions_and_specs_give_clear_errors(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="no adapter named 'other'.*known: demo"):
        registry.resolve("other")
    with pytest.raises(RegistryError, match="no version 9; versions: 1, 2, 3"):
        registry.resolve("demo@9")
    with pytest.raises(RegistryError, match="no promoted version; promote one"):
        registry.resolve("demo")
    with pytest.raises(RegistryError, match="must be a version number"):
        registry.resolve("demo@v2")
    with pytest.raises(RegistryError, match="not allowed"):
        registry.resolve("../etc")
    with pytest.raises(AdapterError, match="does not exist"):
        registry.register("demo", tmp_path / "missing")


def test_adapter_for_another_base_cannot_join_a_name(registry: Registry, adapters: dict, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    shutil.copytree(adapters["a"][0], foreign)
    meta = json.loads((foreign / METADATA_FILE).read_text())
    meta.update(base_model="some/other-model", base_fingerprint="0123456789abcdef")
    (foreign / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(RegistryError, match="base 'packaged'.*other-model.*another name"):
        registry.register("demo", foreign)
    assert registry.register("other", foreign).version == 1


def test_root_defaults_to_env_then_registry(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv(REGISTRY_ENV, raising=False)
    assert registry_root() == Path(DEFAULT_REGISTRY)
    monkeypatch.setenv(REGISTRY_ENV, str(tmp_path))
    assert Registry().root == tmp_path and Registry("x").root == Path("x")


def test_cli_list_show_promote_rollback(registry: Registry, capsys) -> None:
    root = ["--registry", str(registry.root)]
    assert registry_main(root + ["promote", "demo", "2", "--reason", "cli"]) == 0
    assert registry_main(root + ["promote", "demo", "3"]) == 0
    assert registry_main(root + ["list"]) == 0
    assert "demo: versions 1, 2, 3*  (promoted: 3)" in capsys.readouterr().out
    assert registry_main(root + ["rollback", "demo"]) == 0
    assert "rolled back demo to version 2" in capsys.readouterr().out
    assert registry_main(root + ["show", "demo", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["spec"] == "demo@2" and info["promoted"] and info["decision"]["passed"]
    assert [e["action"] for e in info["history"]] == ["promote", "promote", "rollback"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "retrieval_lora.registry", *root, "show", "demo@7"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "error: adapter 'demo' has no version 7" in done.stderr and "Traceback" not in done.stderr


def test_registry_package_never_imports_its_cli() -> None:
    """The API is importable alone (no import cycle with the CLI) and keeps its public names."""
    code = ("import sys, retrieval_lora.registry as r; "
            "assert not any(m.startswith('retrieval_lora.registry.') for m in sys.modules), sorted(sys.modules); "
            "print(r.Registry, r.AdapterVersion, r.DEFAULT_REGISTRY, r.REGISTRY_ENV, r.registry_root)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_training_ends_by_gating_registering_and_promoting(tiny_beir: Path, tmp_path: Path, base_path: str,
                                                           capsys) -> None:
    from retrieval_lora.train import main as train_main

    registry = Registry(tmp_path / "reg")
    code = train_main(["--task", "embedder", "--data", str(tiny_beir), "--base", base_path, "--output",
                       str(tmp_path / "runs"), "--epochs", "3", "--batch-size", "4", "--lora-rank", "4",
                       "--max-seq-length", "32", "--eval-split", "train", "--dev-split", "",
                       "--registry", str(registry.root), "--name", "tiny",
                       # 8 queries are too few for significance; this test is about the wiring
                       "--no-gate-require-significance", "--gate-min-gain", "0", "--gate-max-regressed-share", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    report = tmp_path / "runs" / "embedder" / "evaluation"
    assert f"Report: {report / 'report.html'}" in printed and "gate: PASSED" in printed
    assert "Registered and promoted tiny@1" in printed
    version = registry.resolve("tiny")
    assert version.version == 1 and version.decision()["passed"]
    assert (version.report_dir / "report.html").is_file() and version.metrics()["split"] == "train"
    assert version.manifest()["config"]["lora"]["rank"] == 4
    assert registry.history("tiny")[0]["reason"].startswith("gate passed: ndcg@10 went from")
    metrics = json.loads((tmp_path / "runs" / "embedder" / "metrics.json").read_text())
    assert metrics["decision"]["passed"] and "p_value" in metrics
