"""Atomic checkpoints: written to `<name>.tmp`, then renamed; resume continues exactly.

A checkpoint directory `checkpoints/step_000010/` holds
- model.safetensors: the full policy weights (HF names), the masters as the optimizer holds
  them (fp32 by default, whatever the compute dtype), so that a resumed run is bit-identical;
- state.pt: optimizer state (full, FQN keys), step, data cursor and RNG state, read back
  with `torch.load(weights_only=True)`.
Only rank 0 writes; every rank takes part in gathering the full state (FSDP).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from rptfast.distributed import Dist, barrier


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU weights; a collective under FSDP."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def _atomic_dir(final: Path) -> Path:
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _commit(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def save(run_dir: Path, step: int, model: torch.nn.Module, optimizer, extra: dict, d: Dist, keep: int) -> Path:
    """Checkpoint `step`; the lr schedule is a pure function of the step, so the step is enough."""
    weights = full_model_state(model)
    optim = get_optimizer_state_dict(model, optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    final = run_dir / "checkpoints" / f"step_{step:06d}"
    if d.main:
        tmp = _atomic_dir(final)
        save_file({k: v.contiguous() for k, v in weights.items()}, tmp / "model.safetensors")
        torch.save({"optimizer": optim, "step": step,
                    "rng": torch.get_rng_state(), **extra}, tmp / "state.pt")
        _commit(tmp, final)
        for old in sorted(final.parent.glob("step_*[0-9]"))[:-keep]:
            shutil.rmtree(old)
    barrier(d)
    return final


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (a `.tmp` directory is an interrupted write, never read)."""
    done = sorted((run_dir / "checkpoints").glob("step_*[0-9]"))
    return done[-1] if done else None


def load(path: Path, model: torch.nn.Module, optimizer, d: Dist) -> dict:
    """Restore weights and optimizer in place; return the rest of the saved state (step, cursor)."""
    state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=d.world > 1)
    set_model_state_dict(model, load_file(path / "model.safetensors"), options=opts)
    set_optimizer_state_dict(model, optimizer, state.pop("optimizer"), options=opts)
    torch.set_rng_state(state.pop("rng"))
    return state


def save_hf(out: Path, model: torch.nn.Module, tokenizer, d: Dist, dtype: torch.dtype | None = None) -> Path:
    """The policy as a HF directory (safetensors) that transformers and vLLM load.

    dtype: the weights (and config.json's torch_dtype) in it; None keeps the masters' dtype.
    """
    weights = full_model_state(model)
    if d.main:
        tmp = _atomic_dir(out)
        config_dtype = model.config.dtype
        if dtype is not None:
            weights = {k: v.to(dtype) for k, v in weights.items()}
            model.config.dtype = dtype  # what config.json's torch_dtype says
        model.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
        model.config.dtype = config_dtype
        tokenizer.save_pretrained(tmp)
        _commit(tmp, out)
    barrier(d)
    return out
