"""Where this process stands in a (possibly distributed) run. One process is simply `World(0, 1)`."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class World:
    """rank: this process's index; size: the number of processes. Rank 0 writes logs and checkpoints."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> World:
        """From torchrun's RANK / WORLD_SIZE variables; a plain process is `World(0, 1)`."""
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
