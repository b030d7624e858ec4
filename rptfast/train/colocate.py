"""Colocation: the engine and the trainer share the device, one at a time.

Around every RL step: the engine generates while the trainer's optimizer state (and, if
configured, its weights) sits in pinned host memory (trainer_out); the engine sleeps and the state
comes back (trainer_in) for the update; then it goes out again and the new weights go into the
engine, which wakes (sync). On the CPU there is nowhere else to put anything: trainer_out and
trainer_in do nothing there, and the engine's sleep is vLLM's no-op.
"""

from __future__ import annotations

import torch

from rptfast.distributed import full_tensors
from rptfast.model import lora
from rptfast.train.run import Run


def _storages(tensors) -> list[torch.UntypedStorage]:
    """The distinct storages behind `tensors` (a DTensor's: its local shard's), 0-dim tensors left out."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            s = (t._local_tensor if hasattr(t, "_local_tensor") else t).untyped_storage()
            if s.nbytes():
                seen.setdefault(s.data_ptr(), s)
    return list(seen.values())


def offload(tensors) -> list[tuple[torch.UntypedStorage, torch.UntypedStorage]]:
    """Copies each storage behind `tensors` to host memory (pinned where CUDA is), then frees it in place.

    In place, storage by storage (resize to 0), as FSDP2 frees unsharded parameters: the tensors the
    optimizer and the model hold stay the same objects, DTensors included (whose ops have no sharding
    rule for is_pinned, so a DTensor cannot be moved with .to().pin_memory()). Returns what restore needs.
    """
    pin = torch.cuda.is_available()
    stash = []
    for s in _storages(tensors):
        host = torch.UntypedStorage(s.nbytes(), device="cpu")
        host = host.pin_memory() if pin else host
        host.copy_(s, non_blocking=pin)
        stash.append((s, host))
    if pin:
        torch.cuda.synchronize()
    for s, _ in stash:
        s.resize_(0)
    return stash


def restore(stash: list[tuple[torch.UntypedStorage, torch.UntypedStorage]]) -> None:
    """Undoes offload: each storage regrown on its device and filled from its host copy."""
    for s, host in stash:
        s.resize_(host.nbytes())
        s.copy_(host, non_blocking=True)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def trainer_out(run: Run) -> None:
    """Before the engine runs: optimizer state (and, if configured, weights) to pinned CPU memory."""
    if run.d.device.type != "cuda":
        return  # on the CPU there is nowhere else to put them
    if run.cfg.train.offload_optimizer:
        run.offloaded = offload(optimizer_tensors(run.optimizer))
    if run.cfg.train.offload_weights:  # plain tensors only (no FSDP: build() says so); sync reads them on the host
        for p in trained(run):
            p.data = p.data.to("cpu", non_blocking=True).pin_memory()
    torch.cuda.empty_cache()


def trainer_in(run: Run) -> None:
    """After the engine sleeps: optimizer state (and weights) back on the device."""
    if run.d.device.type != "cuda":
        return
    if run.cfg.train.offload_weights:
        for p in trained(run):
            p.data = p.data.to(run.d.device, non_blocking=True)
    restore(run.offloaded)
    run.offloaded = []


def trained(run: Run) -> list[torch.nn.Parameter]:
    """The weights the optimizer updates: all of them, or a LoRA run's adapters (its frozen base may be the
    engine's own tensors, which must stay where the engine reads them)."""
    return [p for p in run.policy.parameters() if p.requires_grad]


def sync_tensors(run: Run):
    """(name, full tensor in the engine's dtype) of what the sync sends, one at a time: every weight, or a
    LoRA run's adapters (the engine's base never changes)."""
    dtype = getattr(run.engine, "dtype", None)
    if lora.is_lora(run.policy.lm):
        return lora.adapter_tensors(run.policy.lm, dtype)
    return full_tensors(run.policy.lm, dtype)


def sync(run: Run) -> int:
    """New weights into the engine, a bucket at a time (it wakes its weights first, its KV cache after);
    returns the bytes sent.

    Each master shard is cast to the engine's dtype before it is gathered: the engine gets bf16
    from fp32 masters, one tensor at a time. A LoRA run sends its adapters (update_adapter).
    """
    sent = [0]

    def counted(named_tensors):
        for name, t in named_tensors:
            sent[0] += t.numel() * t.element_size()
            yield name, t

    if lora.is_lora(run.policy.lm):
        run.engine.update_adapter(counted(sync_tensors(run)))
    else:
        run.engine.update_weights(counted(sync_tensors(run)))
    return sent[0]
