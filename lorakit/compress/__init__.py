"""Making adapters smaller after training, and models smaller by factorising their linear layers.

    from lorakit.compress import prune_adapter
    report = prune_adapter("runs/sst2/adapter", "runs/sst2/adapter-r2", rank=2)   # what `lorakit prune` does

    factorize   a model's linear layers replaced by low-rank pairs U·Vᵀ (plain or activation-aware SVD)
    factorize_model   what `lorakit factorize` does: load, factorise, save
    save_factorized / export_dense   a factorised model saved for load_model, or multiplied out to a dense checkpoint
    prune   rank pruning: the best rank-k approximation of each module's ΔW, from its factors, saved as a PEFT adapter
"""

from lorakit.compress.command import factorize_model
from lorakit.compress.factorize import FactorizeReport, ModuleFactor, check_factorize_args, factorize
from lorakit.compress.prune import ModulePrune, PruneReport, check_prune_args, prune_adapter
from lorakit.compress.saved import export_dense, factorization_of, save_factorized
from lorakit.factorized import LowRankLinear

__all__ = ["FactorizeReport", "LowRankLinear", "ModuleFactor", "ModulePrune", "PruneReport", "check_factorize_args",
           "check_prune_args", "export_dense", "factorization_of", "factorize",
           "factorize_model", "prune_adapter", "save_factorized"]
