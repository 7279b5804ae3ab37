"""The light part of `retrieval_lora.evaluation`: metric names and paired tests (no ranx or FAISS import)."""

DEFAULT_METRICS = ("ndcg@10", "mrr@10", "recall@100", "map@100")
STAT_TESTS = ("student", "fisher")  # ranx's paired tests (lowercase names; "tukey" is not paired)
FUSION_METHODS = ("convex", "rrf")  # ranx fusion: min-max normalised weighted sum; reciprocal rank fusion
