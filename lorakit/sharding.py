"""Sharded data parallelism with FSDP2 (`torch.distributed.fsdp.fully_shard`): `run.parallel: fsdp`.

Each transformer block is one FSDP unit and the root module a last one (embeddings, final norm, task head). Every
parameter of a unit, the frozen base and the adapter alike, is split in `world.size` shards along its first
dimension; a unit's full weights are all-gathered just before its forward (and again before its backward) and
freed after, so a process holds 1/N of the base plus one or two blocks at a time. The adapter is sharded with the
base rather than kept whole on every process: its factors ride in their block's all-gather (a rank-8 adapter
on every linear layer of SmolLM2 adds 2.3% to it), each process keeps 1/N of their optimizer state, and one kind
of trainable parameter (all DTensors) keeps gradient clipping and the optimizer plain.

Saving gathers: the adapter's full tensors are all-gathered (a few megabytes) and rank 0 writes the same PEFT
adapter a one-process run writes; the optimizer's moments are gathered to rank 0 as a full state dict keyed by
parameter name (`torch.distributed.checkpoint.state_dict`), and every rank loads its shards back from it on resume.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from lorakit.distributed import World
from lorakit.errors import LorakitError

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_launch(parallel: str) -> None:
    """fsdp shards over the processes torchrun starts; a plain process has nothing to shard over.

    Raises LorakitError when `parallel` is fsdp and WORLD_SIZE is unset (no torchrun)."""
    if parallel == "fsdp" and "WORLD_SIZE" not in os.environ:
        raise LorakitError("run.parallel=fsdp shards the model over processes started by torchrun, and this is a "
                           "plain process; launch with torchrun --nproc-per-node N -m lorakit train CONFIG.yaml, or "
                           "set run.parallel=ddp")


def block_classes(model: nn.Module) -> tuple[type[nn.Module], ...]:
    """The transformer block classes of `model`: the classes of the children of each outermost `nn.ModuleList`
    whose children are all one class and hold parameters (BERT's `encoder.layer`, Llama's `model.layers`, T5's
    encoder and decoder `block`s). Found from the structure, so a new architecture needs no list of names.

    Raises LorakitError naming the model's class when it has no such list.
    """
    found: list[type[nn.Module]] = []
    inside: set[int] = set()  # modules under a list already taken: an expert list inside a block is no block
    for module in model.modules():
        if id(module) in inside or not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1 or not any(True for _ in module.parameters()):
            continue
        kind = kinds.pop()
        if kind not in found:
            found.append(kind)
        inside.update(id(m) for m in module.modules())
    if not found:
        raise LorakitError(f"run.parallel=fsdp shards a model block by block, and {type(model).__name__} has no "
                           "list of repeated blocks (an nn.ModuleList of one module class) to shard; "
                           "set run.parallel=ddp")
    return tuple(found)


def shard(model: nn.Module, world: World, device: torch.device, *, mixed_precision: str = "no",
          offload: bool = False) -> nn.Module:
    """Apply `fully_shard` to each transformer block of `model`, then to `model` itself, in place; returns it.

    mixed_precision: bf16 or fp16 gathers and computes with the weights in that dtype and reduces gradients in
        float32 (FSDP2's MixedPrecisionPolicy), on top of the loop's autocast; no: the weights' own dtype.
    offload: keep the shards, their gradients and the optimizer state in CPU memory between uses (CUDA only).
    The model may still be on the CPU: each unit moves to `device` as it is sharded, so a base larger than one
    GPU never lands on one whole. A world of one is moved and trained as it is (nothing to shard over), after the
    same check that its blocks are found.
    Raises LorakitError for a model without blocks, or offload on a CPU run.
    """
    blocks = block_classes(model)
    if offload and device.type != "cuda":
        raise LorakitError("run.fsdp_offload moves shards between GPU and CPU memory, and this run is on the CPU; "
                           "set run.fsdp_offload=false")
    if world.size == 1:
        log.info("run.parallel=fsdp with one process: nothing to shard, training the model whole")
        return model.to(device)
    options: dict[str, Any] = {"mesh": init_device_mesh(device.type, (world.size,))}
    if mixed_precision in _DTYPES:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=_DTYPES[mixed_precision], reduce_dtype=torch.float32)
    if offload:
        options["offload_policy"] = CPUOffloadPolicy()
    units = [m for m in model.modules() if isinstance(m, blocks)]
    for unit in units:
        fully_shard(unit, **options)
    fully_shard(model, **options)
    log.info("fsdp: %d %s units and the root sharded over %d processes", len(units),
             "/".join(b.__name__ for b in blocks), world.size)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def _reshard(model: nn.Module) -> None:
    """Free every gathered weight: after a forward without backward (evaluation) the root unit keeps its full
    weights registered, and the saving below needs each parameter in its sharded form."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _sharded_trainables(model: nn.Module) -> list[tuple[nn.Module, str, DTensor]]:
    """(owning module, attribute name, parameter) of each trainable DTensor parameter, in a fixed order (every rank
    must all-gather the same tensors in the same order)."""
    out: list[tuple[nn.Module, str, DTensor]] = []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad and isinstance(p, DTensor):
                out.append((module, name, cast(DTensor, p)))
    return out


@contextmanager
def full_trainables(model: nn.Module, *, write_back: bool = False) -> Iterator[None]:
    """Inside the block, each trainable parameter of a sharded `model` is its full tensor (a plain `nn.Parameter`),
    so the adapter saving and loading of a one-process run apply unchanged. Every rank must enter (all-gathers).

    write_back: copy the full tensors' values (changed inside the block, e.g. by loading a checkpoint) back into
    each process's shards on exit. The frozen base stays sharded throughout. A no-op for an unsharded model.
    """
    if not is_sharded(model):
        yield
        return
    _reshard(model)
    entries = _sharded_trainables(model)
    full = [nn.Parameter(p.full_tensor().detach().clone(), requires_grad=True) for _, _, p in entries]
    for (module, name, _), tensor in zip(entries, full, strict=True):
        module._parameters[name] = tensor
    try:
        yield
    finally:
        for module, name, sharded in entries:
            module._parameters[name] = cast(nn.Parameter, sharded)
    if write_back:
        with torch.no_grad():
            for (_, _, sharded), tensor in zip(entries, full, strict=True):
                local = distribute_tensor(tensor.detach().to(sharded.device), sharded.device_mesh, sharded.placements)
                sharded.to_local().copy_(local.to_local())


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state gathered whole on rank 0, keyed by parameter name (other ranks get an empty dict).
    Every rank must call it (all-gathers)."""
    _reshard(model)
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """The inverse of `optimizer_state`: every rank passes the full state it read and keeps its own shards."""
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def all_true(flag: bool, world: World) -> bool:
    """True on every rank when `flag` is true on every rank: one rank's non-finite loss stops them all."""
    if world.size == 1 or not dist.is_initialized():
        return flag
    tensor = torch.tensor([0.0 if flag else 1.0])
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return bool(tensor.item() == 0.0)
