"""torchrun, FSDP2 and the full-tensor gather for the weight sync.

One process per GPU (or per CPU process on gloo). Each rank runs its own rollout engine
on its share of the prompts; the trainer is FSDP2 (`fully_shard` per decoder layer, then
the root). The sync gathers full tensors one at a time, lazily, so that the engine's
bucketed reload never sees the whole model twice.

Mixed precision: the parameters FSDP2 keeps (and AdamW updates) are the fp32 masters; its
`MixedPrecisionPolicy` casts them to the compute dtype as it gathers each unit for the
forward and backward (freed after the unit), and reduces gradients in fp32 into fp32 shards.
One process with a compute dtype narrower than the masters gets the same thing on a
world-size-1 mesh: the same numerics as N ranks, and never more than a unit or two of bf16
copies at a time (autocast would keep a bf16 copy of every weight alive from the forward to
the backward, and run the norms and the residual stream in fp32, unlike the engine).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rptfast.errors import DiskFullError, NonFiniteError


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init() -> Dist:
    """Read torchrun's environment; start the process group when there is more than one rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)
    return Dist(rank, world, local, device)


def _single_process_group(d: Dist) -> None:
    """A world-size-1 default group for FSDP2 (vLLM in this process may have made one already)."""
    if not dist.is_initialized():
        cuda = d.device.type == "cuda"
        # NCCL's device_id needs an index: a bare torch.device("cuda") crashes or waits out the timeout
        device_id = None
        if cuda:
            device_id = torch.device("cuda", torch.cuda.current_device() if d.device.index is None else d.device.index)
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                                device_id=device_id)


def shard(model: torch.nn.Module, decoder_layers: torch.nn.ModuleList, d: Dist,
          compute_dtype: torch.dtype | None = None, only_trainable: bool = False) -> torch.nn.Module:
    """FSDP2: one unit per decoder layer, then the root (embeddings, final norm, lm_head).

    compute_dtype (when it differs from the parameters' dtype): forward and backward run in
    it, gradients are reduced and kept in the parameters' dtype. One process without it
    returns the model as it is.

    only_trainable (LoRA): FSDP manages the parameters that train (the adapters) and leaves the
    frozen ones whole on every rank (`ignored_params`): each rank's engine holds the whole base
    anyway, and whole, the trainer's base can be the engine's own tensors (model.lora.share_base).
    """
    ignored = {p for p in model.parameters() if not p.requires_grad} if only_trainable else set()
    master = next(p for p in model.parameters() if p not in ignored).dtype
    mixed = compute_dtype is not None and compute_dtype != master
    if d.world == 1 and not mixed:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if d.world == 1:
        _single_process_group(d)
    mesh = init_device_mesh(d.device.type, (d.world,))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=master) if mixed else MixedPrecisionPolicy()
    for layer in decoder_layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, ignored_params=ignored or None)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=ignored or None)
    return model


def full_tensors(module: torch.nn.Module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for every parameter, gathered one at a time (a collective under FSDP).

    dtype: each shard is cast before its gather (the engine's dtype: half the bytes moved for
    bf16 from fp32 masters), so a bf16 copy of one tensor at a time exists, never of the model.
    """
    for name, p in module.named_parameters():
        t = p.data if dtype is None else p.data.to(dtype)
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        yield name, t


def all_sum(values: list[float], d: Dist) -> list[float]:
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def all_max(values: list[float], d: Dist) -> list[float]:
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_gather_objects(obj, d: Dist) -> list:
    if d.world == 1:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def on_main(d: Dist, fn: Callable[[], None]) -> None:
    """fn() on rank 0 while the others wait; then every rank raises what it raised (DiskFullError and
    NonFiniteError as themselves, anything else as RuntimeError): a rank that failed alone would leave the
    others waiting in the next collective until the job's timeout."""
    failure = None
    if d.main:
        try:
            fn()
        except Exception as e:
            failure = e
    if d.world > 1:
        sent = [None if failure is None else (type(failure).__name__, str(failure))]
        dist.broadcast_object_list(sent, src=0)
        if not d.main and sent[0] is not None:
            kinds = {"DiskFullError": DiskFullError, "NonFiniteError": NonFiniteError}
            raise kinds.get(sent[0][0], RuntimeError)(f"rank 0: {sent[0][1]}")
    if failure is not None:
        raise failure


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
