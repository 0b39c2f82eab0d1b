"""Making adapters smaller after training.

    from lorakit.compress import prune_adapter
    report = prune_adapter("runs/sst2/adapter", "runs/sst2/adapter-r2", rank=2)   # what `lorakit prune` does

    prune   rank pruning: the best rank-k approximation of each module's ΔW, from its factors, saved as a PEFT adapter
"""

from lorakit.compress.prune import ModulePrune, PruneReport, check_prune_args, prune_adapter

__all__ = ["ModulePrune", "PruneReport", "check_prune_args", "prune_adapter"]
