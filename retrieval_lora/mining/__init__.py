"""Hard-negative mining: encode (cached), search with FAISS, choose negatives, report stats.

    from retrieval_lora.mining import MiningConfig, mine_hard_negatives, save_mining_result

    result = mine_hard_negatives(model, dataset, "train", MiningConfig(negatives=4))
    train_adapter(config, dataset, run_dir, rows=result.training_rows())
    save_mining_result(result, "runs/mined")
"""

from retrieval_lora.lazy import lazy_exports
from retrieval_lora.mining.config import MiningConfig

__getattr__ = lazy_exports(__name__, {"mine_hard_negatives": ".hard_negatives", "MiningResult": ".result",
                                      "load_mining_result": ".result", "save_mining_result": ".result"})

__all__ = ["MiningConfig", "MiningResult", "mine_hard_negatives", "save_mining_result", "load_mining_result"]

__all__ = ["MiningConfig"]  # and the lazily loaded names above
