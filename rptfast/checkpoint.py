"""Atomic, verified checkpoints: written to `<name>.tmp`, then renamed; resume continues exactly.

A checkpoint directory `checkpoints/step_000010/` holds
- model.safetensors: the full policy weights (HF names), the masters as the optimizer holds
  them (fp32 by default, whatever the compute dtype), so that a resumed run is bit-identical;
  a tied weight (lm_head = embed_tokens) is stored once, its other names in the file's metadata;
- state.pt: optimizer state (full, FQN keys), step, data cursor and RNG state, read back
  with `torch.load(weights_only=True)`;
- ema.safetensors (data.reward = "info_gain" only): the EMA baseline's fp32 weights;
- LoRA runs (model.lora_rank > 0): model.safetensors and ema.safetensors hold the adapters only (the frozen
  base is model.path's, unchanged), and the optimizer state is the adapters'; `final/` is peft's adapter
  folder, plus `final/merged/` (a plain HF model, the adapter merged) with model.lora_merged;
- manifest.json, written last (temp name, then rename): size and SHA-256 of each file.
`latest` verifies manifests newest first and falls back to the previous intact checkpoint
(saying so, and renaming the damaged one to `.damaged`), which is why `keep_ckpts` keeps more
than one. Hashing reads every byte once on save and once on resume (about 2 GB/s with
SHA-NI): minutes for a 14B model's 224 GB of weights and Adam state, small beside writing them.
Non-finite tensors are refused on save: a broken model is never written as a good one.
Only rank 0 writes; every rank takes part in gathering the full state (FSDP).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from rptfast.distributed import Dist, barrier
from rptfast.errors import NonFiniteError
from rptfast.model import lora

MANIFEST = "manifest.json"


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU weights, a LoRA model's adapters only; a collective under FSDP."""
    if lora.is_lora(model):
        return lora.adapter_state(model)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def save_weights(weights: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors of `weights`, each storage once: a name that aliases an earlier tensor (a tied lm_head is
    the embedding itself) is written as metadata {"tied": {name: name it aliases}} instead of a second copy."""
    first: dict[tuple, str] = {}
    tensors, tied = {}, {}
    for name, w in weights.items():
        key = (w.untyped_storage().data_ptr(), w.storage_offset(), tuple(w.shape), tuple(w.stride()), w.dtype)
        if w.numel() and key in first:
            tied[name] = first[key]
        else:
            first[key] = name
            tensors[name] = w.contiguous()
    save_file(tensors, path, metadata={"tied": json.dumps(tied)})


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """What save_weights wrote, every name back (a tied name maps to the tensor it aliases)."""
    weights = load_file(path)
    with safe_open(path, "pt") as f:
        tied = json.loads((f.metadata() or {}).get("tied", "{}"))
    weights.update({name: weights[source] for name, source in tied.items()})
    return weights


def refuse_nonfinite(weights: dict[str, torch.Tensor], where: Path) -> None:
    """NonFiniteError naming the first tensors with inf or NaN; one fused norm pass over all of them."""
    names = list(weights)
    norms = torch._foreach_norm([weights[k].float() if not weights[k].is_floating_point() else weights[k]
                                 for k in names])
    bad = [k for k, n in zip(names, norms) if not torch.isfinite(n)]
    if bad:
        raise NonFiniteError(f"refusing to save {str(where)!r}: {len(bad)} tensors are non-finite "
                             f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); the last complete "
                             f"checkpoint is untouched")


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(d: Path) -> None:
    """Size and SHA-256 of every file in d, written last under a temp name and renamed."""
    files = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(d.iterdir()) if f.is_file() and f.name != MANIFEST}
    tmp = d / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=1))
    os.replace(tmp, d / MANIFEST)


def verify(d: Path) -> str | None:
    """None when d matches its manifest, else what is wrong (one phrase)."""
    try:
        files = json.loads((d / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return "no manifest.json (its write never finished)"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "manifest.json is damaged"
    for name, want in files.items():
        f = d / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {want['bytes']}"
        if _sha256(f) != want["sha256"]:
            return f"{name} does not match its SHA-256 (the bytes changed after the save)"
    return None


def _atomic_dir(final: Path) -> Path:
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _commit(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def save(run_dir: Path, step: int, model: torch.nn.Module, optimizer, extra: dict, d: Dist, keep: int,
         ema: torch.nn.Module | None = None) -> Path:
    """Checkpoint `step`; the lr schedule is a pure function of the step, so the step is enough."""
    weights = full_model_state(model)
    ema_weights = None if ema is None else full_model_state(ema)
    optim = get_optimizer_state_dict(model, optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    final = run_dir / "checkpoints" / f"step_{step:06d}"
    if d.main:
        refuse_nonfinite(weights, final)
        tmp = _atomic_dir(final)
        save_weights(weights, tmp / "model.safetensors")
        if ema_weights is not None:
            refuse_nonfinite(ema_weights, final)
            save_weights(ema_weights, tmp / "ema.safetensors")
        torch.save({"optimizer": optim, "step": step,
                    "rng": torch.get_rng_state(), **extra}, tmp / "state.pt")
        write_manifest(tmp)
        _commit(tmp, final)
        for old in sorted(final.parent.glob("step_*[0-9]"))[:-keep]:
            shutil.rmtree(old)
    barrier(d)
    return final


def latest(run_dir: Path, say: Callable[[str], None] = print, check: bool = True, main: bool = True) -> Path | None:
    """The newest intact checkpoint (a `.tmp` directory is an interrupted write, never read).

    With `check`, each is verified against its manifest, newest first; a damaged one is renamed
    (by the `main` rank only) to `<name>.damaged`, kept for inspection and never read again, and
    the previous one is tried.
    """
    done = sorted((run_dir / "checkpoints").glob("step_*[0-9]"), reverse=True)
    if not check:
        return done[0] if done else None
    for ckpt in done:
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        if main:
            shutil.rmtree(ckpt.with_name(ckpt.name + ".damaged"), ignore_errors=True)
            ckpt.rename(ckpt.with_name(ckpt.name + ".damaged"))
        say(f"WARNING checkpoint {ckpt} is damaged ({problem}); renamed to {ckpt.name}.damaged, "
            f"falling back to the previous one")
    return None


def load(path: Path, model: torch.nn.Module, optimizer, d: Dist, ema: torch.nn.Module | None = None) -> dict:
    """Restore weights, optimizer (and the EMA baseline) in place; return the rest of the saved state."""
    state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    # a LoRA checkpoint holds the adapters only: the rest of the model stays as model.path loaded it
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=d.world > 1, strict=not lora.is_lora(model))
    for module, name in ((model, "model.safetensors"), (ema, "ema.safetensors")):
        if module is None:
            continue
        weights = load_weights(path / name)
        if lora.is_lora(module) and set(weights) != {n for n, _ in lora.adapter_params(module)}:
            raise ValueError(f"{path / name} does not hold this run's adapters (model.lora_*): "
                             f"{sorted(set(weights) ^ {n for n, _ in lora.adapter_params(module)})[:3]}")
        set_model_state_dict(module, weights, options=opts)
    set_optimizer_state_dict(model, optimizer, state.pop("optimizer"), options=opts)
    torch.set_rng_state(state.pop("rng"))
    return state


def save_hf(out: Path, model: torch.nn.Module, tokenizer, d: Dist, dtype: torch.dtype | None = None,
            merged: bool = False) -> Path:
    """The policy as a HF directory (safetensors) that transformers and vLLM load.

    dtype: the weights (and config.json's torch_dtype) in it; None keeps the masters' dtype.
    A LoRA policy: peft's adapter folder (its fp32 adapters, the tokenizer), and with `merged` also
    `merged/`, the HF model with the adapter merged in `dtype`.
    """
    if lora.is_lora(model):
        return _save_lora(out, model, tokenizer, d, dtype, merged)
    weights = full_model_state(model)
    if d.main:
        refuse_nonfinite(weights, out)
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


def _save_lora(out: Path, model: torch.nn.Module, tokenizer, d: Dist, dtype: torch.dtype | None,
               merged: bool) -> Path:
    tensors = dict(lora.adapter_tensors(model))  # gathered on every rank (collectives), written by the main one
    weights = lora.merged_weights(model, dtype or model.dtype) if merged else None
    if d.main:
        refuse_nonfinite(tensors, out)
        tmp = _atomic_dir(out)
        lora.write_adapter(tmp, tensors, lora.adapter_config(model))
        tokenizer.save_pretrained(tmp)
        if weights is not None:
            refuse_nonfinite(weights, out / "merged")
            config_dtype = model.config.dtype
            model.config.dtype = dtype or config_dtype
            try:
                model.save_pretrained(tmp / "merged", state_dict=weights, safe_serialization=True)
            finally:
                model.config.dtype = config_dtype
            tokenizer.save_pretrained(tmp / "merged")
        _commit(tmp, out)
    barrier(d)
    return out
