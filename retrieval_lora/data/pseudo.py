"""Training queries without labels: pseudo-queries made from the corpus alone.

Each method turns documents into (pseudo-query, document) pairs, which become a qrels split
named `PSEUDO_SPLIT` beside the dataset's own; mining and training then run on that split as on a
labelled one (hard negatives from the frozen base, likely false negatives filtered). No label of
the dataset is read.

  crop       a span of `crop_words` consecutive words cut from the document at a seeded place
             (inverse cloze task / Contriever-style cropping): the query is part of its positive.
  title      the document's title as the query (documents without a title are skipped).
  generator  queries written by a seq2seq model (doc2query style, a hub id or a local folder):
             batched, the input truncated to `max_input_tokens`, `per_document` sampled queries
             per document, a progress bar; cached under the embedding cache folder by corpus
             fingerprint, generator identity and settings, so a rerun generates nothing.

Documents used: a seeded sample of `documents` ids (0 = every document). The same seed gives the
same queries, independent of the order the corpus was read in.

    pseudo = pseudo_queries(dataset, PseudoSettings(method="crop", documents=1000))
    dataset = with_pseudo_split(dataset, pseudo)   # qrels["pseudo"]: pseudo-query -> its document
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from retrieval_lora.data.beir import RetrievalDataset
from retrieval_lora.data.fingerprint import corpus_fingerprint
from retrieval_lora.errors import ConfigError, DataError

METHODS = ("crop", "title", "generator")
PSEUDO_SPLIT = "pseudo"
WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class PseudoSettings:
    """How pseudo-queries are made (the training config's `pseudo_*` fields)."""

    method: str
    documents: int = 0
    per_document: int = 1
    seed: int = 42
    crop_words: tuple[int, int] = (5, 16)
    generator: str | None = None
    batch_size: int = 16
    max_input_tokens: int = 256
    max_new_tokens: int = 32

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"pseudo_queries={self.method!r}: must be one of {', '.join(METHODS)} (or 'off')")
        if self.method == "generator" and not self.generator:
            raise ConfigError("pseudo_queries='generator' needs --generator: a seq2seq query generator's hub id or "
                              "local folder (doc2query style, e.g. a T5 trained on MS MARCO)")
        if self.documents < 0 or self.per_document < 1:
            raise ConfigError(f"pseudo-query counts: documents={self.documents} must be >= 0 (0 = all), "
                              f"per_document={self.per_document} must be >= 1")


def pseudo_queries(dataset: RetrievalDataset, settings: PseudoSettings,
                   cache_dir: str | None = None, show_progress: bool = True) -> dict[str, tuple[str, str]]:
    """Pseudo-query id -> (query text, the id of the document it was made from)."""
    chosen = _chosen_documents(dataset, settings)
    if settings.method == "crop":
        made = {doc_id: _crops(dataset.corpus[doc_id].full_text, doc_id, settings) for doc_id in chosen}
    elif settings.method == "title":
        made = {doc_id: [dataset.corpus[doc_id].title.strip()] for doc_id in chosen if dataset.corpus[doc_id].title.strip()}
    else:
        made = generated_queries(dataset, chosen, settings, cache_dir, show_progress)
    pseudo = {f"{PSEUDO_SPLIT}:{doc_id}:{i}": (text, doc_id)
              for doc_id, texts in made.items() for i, text in enumerate(dict.fromkeys(texts)) if text}
    if not pseudo:
        raise DataError(f"{dataset.root}: no pseudo-query could be made with method {settings.method!r} "
                        f"({len(chosen)} documents tried; 'title' needs documents with titles)")
    return pseudo


def with_pseudo_split(dataset: RetrievalDataset, pseudo: dict[str, tuple[str, str]]) -> RetrievalDataset:
    """`dataset` with the pseudo-queries added and qrels split `PSEUDO_SPLIT` pairing each with its document."""
    queries = {**dataset.queries, **{qid: text for qid, (text, _) in pseudo.items()}}
    qrels = {**dataset.qrels, PSEUDO_SPLIT: {qid: {doc_id: 1} for qid, (_, doc_id) in pseudo.items()}}
    return dataclasses.replace(dataset, queries=queries, qrels=qrels)


def _chosen_documents(dataset: RetrievalDataset, settings: PseudoSettings) -> list[str]:
    ids = sorted(doc_id for doc_id, doc in dataset.corpus.items() if doc.full_text)
    if settings.documents and settings.documents < len(ids):
        ids = sorted(random.Random(settings.seed).sample(ids, settings.documents))
    return ids


def _crops(text: str, doc_id: str, settings: PseudoSettings) -> list[str]:
    """`per_document` spans of consecutive words of `text`, seeded by the seed and the document id."""
    words = WORD.findall(text)
    low, high = settings.crop_words
    if len(words) < low + 1:  # too short to leave the document more than its query
        return []
    rng = random.Random(f"{settings.seed}:{doc_id}")
    crops = []
    for _ in range(settings.per_document):
        length = rng.randint(low, min(high, len(words) - 1))
        start = rng.randint(0, len(words) - length)
        crops.append(" ".join(words[start:start + length]))
    return crops


def generator_identity(generator: str) -> str:
    """What names a generator's outputs: a local folder's config and weights file sizes, or the hub id."""
    folder = Path(generator)
    if not folder.is_dir():
        return generator
    parts = [(folder / "config.json").read_text(encoding="utf-8") if (folder / "config.json").is_file() else ""]
    parts += [f"{p.name}:{p.stat().st_size}" for p in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def generated_queries(dataset: RetrievalDataset, doc_ids: list[str], settings: PseudoSettings,
                      cache_dir: str | None, show_progress: bool = True) -> dict[str, list[str]]:
    """Document id -> `per_document` queries sampled from the seq2seq `settings.generator`, cached."""
    key = hashlib.sha256(json.dumps([corpus_fingerprint(dataset), generator_identity(settings.generator), doc_ids,
                                     dataclasses.asdict(settings)], sort_keys=True, default=str).encode()).hexdigest()[:16]
    cache = Path(cache_dir) / "pseudo-queries" / f"{key}.json" if cache_dir else None
    if cache is not None and cache.is_file():
        return json.loads(cache.read_text(encoding="utf-8"))
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(settings.generator)
        model = AutoModelForSeq2SeqLM.from_pretrained(settings.generator).eval()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load query generator {settings.generator!r} ({exc}): give a local folder or a hub "
                          "id of a seq2seq model (AutoModelForSeq2SeqLM) reachable from here") from exc
    torch.manual_seed(settings.seed)
    made: dict[str, list[str]] = {}
    batches = range(0, len(doc_ids), settings.batch_size)
    for start in tqdm(batches, desc="Generating queries", unit="batch", disable=not show_progress):
        chunk = doc_ids[start:start + settings.batch_size]
        inputs = tokenizer([dataset.corpus[d].full_text for d in chunk], truncation=True, padding=True,
                           max_length=settings.max_input_tokens, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                    do_sample=True, top_k=10, max_new_tokens=settings.max_new_tokens,
                                    num_return_sequences=settings.per_document)
        texts = [t.strip() for t in tokenizer.batch_decode(output, skip_special_tokens=True)]
        for i, doc_id in enumerate(chunk):
            made[doc_id] = texts[i * settings.per_document:(i + 1) * settings.per_document]
    if cache is not None:
        from retrieval_lora.manifest import write_json_atomic

        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache, made)
    return made
