"""The settings of hard-negative mining, validated in one place."""

from __future__ import annotations

from dataclasses import dataclass

from retrieval_lora.config import field
from retrieval_lora.errors import ConfigError

SAMPLINGS = ("top", "random")
INDEXES = ("auto", "exact", "ivf", "hnsw", "ivfpq")
CACHE_DTYPES = ("float16", "float32")
SHORT_ROWS = ("drop", "fill")


@dataclass
class MiningConfig:
    """How negatives are chosen for each (query, positive) training row.

    Candidates are the documents at ranks `rank_start` .. `rank_end - 1` (0-based) of the
    query's ranking with its labelled positives (and exact text duplicates of them) removed.
    Guards against unlabelled positives then drop candidates scoring above `margin` x the
    row's positive score and, optionally, those a cross-encoder scores likewise above the
    positive. `negatives` of the survivors are kept (`top`: the best ranked; `random`: a
    seeded sample). A row with fewer survivors is dropped and counted (`short_rows="drop"`) or,
    with `short_rows="fill"`, completed by the best-ranked candidates past the window (ranks
    `rank_end` .. `fill_depth - 1`, positives removed) that pass the same guards; a row still
    short after that is dropped and counted.
    """

    negatives: int = field(4, "hard negatives per (query, positive) row")
    rank_start: int = field(10, "first rank (0-based, positives excluded) a negative may come from; skips the top ones, likely unlabelled positives")
    rank_end: int = field(100, "end of the candidate window (exclusive); must not exceed the corpus size")
    margin: float = field(0.95, "drop candidates scoring above margin x the positive's score (sign-safe: pos - |pos| x (1 - margin)); 0 turns the filter off")
    short_rows: str = field("drop", "a row with fewer than `negatives` guarded candidates in the window: 'drop' it (counted) or 'fill' it with the best-ranked guarded candidates past the window, down to --fill-depth (measured, evals/results/short_rows_*.md: fill kept 9% more SciFact rows and 2.7x NFCorpus's, and trained no better adapter: -0.0006 and -0.0082 nDCG@10, p 0.93 and 0.07)")
    fill_depth: int = field(1000, "with --short-rows fill: end (exclusive, positives excluded) of the ranking searched for fill candidates; at most the corpus size")
    sampling: str = field("top", "which survivors become negatives: 'top' (best ranked) or 'random' (seeded sample)")
    index: str = field("auto", "FAISS index: 'exact' (inner product, streamed over the vectors), 'ivf', 'hnsw', 'ivfpq' (compressed codes, trained on a sample; for corpora that do not fit flat in memory), or 'auto' (HNSW above --approximate-above documents, IVF-PQ above --compress-above)")
    approximate_above: int = field(500_000, "with --index auto: use an HNSW index for corpora larger than this")
    compress_above: int = field(2_000_000, "with --index auto: use an IVF-PQ index for corpora larger than this (a flat or HNSW index keeps 4 bytes per dimension per document: 3 GB at 2M x 384)")
    nlist: int = field(0, "IVF and IVF-PQ: number of clusters; 0 = 4 sqrt(documents) (at least 39 training vectors each)")
    nprobe: int = field(32, "IVF and IVF-PQ: clusters visited per query (more = higher recall, slower)")
    pq_bytes: int = field(64, "IVF-PQ only: bytes per document code (one 8-bit sub-quantizer per byte); must divide the embedding dimension")
    train_sample: int = field(200_000, "IVF-PQ only: vectors (a seeded sample of the corpus) the clusters and codes are trained on")
    refine: int = field(4, "IVF-PQ only: candidates per wanted result taken from the compressed index and rescored exactly from the stored vectors (1 = rescore only the results)")
    ef_search: int = field(256, "HNSW only: search breadth (raised to the search depth if lower)")
    recall_queries: int = field(200, "approximate index: queries (seeded sample) whose recall against exact search is measured")
    seed: int = field(42, "seed of random sampling and of the recall sample")
    batch_size: int = field(64, "texts per encoding batch")
    cache_dir: str | None = field("data/cache/embeddings", "embedding cache folder (reused across runs and by evaluation); '' to turn it off")
    cache_dtype: str = field("float16", "storage type of cached embeddings: float16 (half the size) or float32")
    cross_encoder: str | None = field(None, "optional cross-encoder (folder or hub id) whose scores also filter false negatives")
    show_progress: bool = field(True, "show encoding progress bars")

    def __post_init__(self) -> None:
        problems = []
        if self.negatives < 1:
            problems.append(f"negatives={self.negatives}: must be >= 1")
        if self.rank_start < 0:
            problems.append(f"rank_start={self.rank_start}: must be >= 0")
        if self.rank_end - self.rank_start < self.negatives:
            problems.append(f"rank window {self.rank_start}..{self.rank_end} holds fewer than negatives={self.negatives} "
                            "candidates; raise rank_end or lower rank_start/negatives")
        if not 0.0 <= self.margin <= 1.0:
            problems.append(f"margin={self.margin}: must be in [0, 1] (e.g. 0.95; 0 = off)")
        for name, value, allowed in (("sampling", self.sampling, SAMPLINGS), ("index", self.index, INDEXES),
                                     ("cache_dtype", self.cache_dtype, CACHE_DTYPES),
                                     ("short_rows", self.short_rows, SHORT_ROWS)):
            if value not in allowed:
                problems.append(f"{name}={value!r}: must be one of {', '.join(allowed)}")
        if self.short_rows == "fill" and self.fill_depth <= self.rank_end:
            problems.append(f"fill_depth={self.fill_depth}: must be above rank_end={self.rank_end} with short_rows='fill' "
                            "(fill candidates come from the ranks past the window)")
        if self.nlist < 0:
            problems.append(f"nlist={self.nlist}: must be >= 0 (0 = 4 sqrt(documents))")
        for name in ("approximate_above", "compress_above", "nprobe", "ef_search", "recall_queries", "batch_size",
                     "pq_bytes", "train_sample", "refine"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)}: must be >= 1")
        if problems:
            raise ConfigError("invalid mining settings: " + "; ".join(problems))
