"""Data parallelism on torch.distributed: process group, DDP over the trainable parameters, small collectives.

Launched by `torchrun`; a plain process is a world of one and every function here is then a no-op. Only the
adapter (and saved modules) require grad, and DDP registers only parameters that require grad, so the frozen
base is never synchronised: each step all-reduces a few megabytes, not the model.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lorakit.errors import LorakitError

log = logging.getLogger(__name__)


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


def init_world(device: torch.device) -> World:
    """The world torchrun describes (RANK, WORLD_SIZE, ...), with its process group started: NCCL on CUDA, gloo
    on CPU. Without torchrun: `World(0, 1)` and no process group."""
    world = World.from_env()
    if world.size == 1 or dist.is_initialized():
        return world
    if "MASTER_ADDR" not in os.environ:
        raise LorakitError("WORLD_SIZE > 1 but MASTER_ADDR is unset; launch with torchrun "
                           "(torchrun --nproc-per-node N -m lorakit train CONFIG.yaml)")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    log.info("rank %d of %d joined (%s)", world.rank, world.size, dist.get_backend())
    return world


def device_for(world: World, device: torch.device) -> torch.device:
    """Each process on its own GPU (LOCAL_RANK); CPU stays CPU."""
    if device.type == "cuda" and world.size > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def wrap(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """DDP over the parameters that require grad (the adapter and saved modules); the model itself if alone."""
    if world.size == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def all_reduce_mean(values: list[float], world: World) -> list[float]:
    """The mean over ranks of each value (training loss, tokens/s for the log)."""
    if world.size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return (tensor / world.size).tolist()


def gather_objects(obj: Any, world: World) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (used for per-rank RNG states in checkpoints)."""
    if world.size == 1:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def shutdown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
