"""Sharded, atomic, verified checkpoints (torch.distributed.checkpoint); resume continues exactly.

A checkpoint directory `checkpoints/step_000010/` holds
- `__<rank>_<n>.distcp` and `.metadata`: DCP's shards. Every rank writes its own part of the
  model's masters (fp32 by default, whatever the compute dtype), the AdamW moments and, with
  data.reward = "info_gain", the EMA baseline's fp32 weights, in parallel: no rank ever holds
  the full state (a 14B run's 178 GB of masters and moments would not fit one host). Keys
  `model.<fqn>`, `optim.<fqn>.<exp_avg|exp_avg_sq|step>`, `ema.<fqn>`; tensors only (DCP
  unpickles non-tensor values, so none are written, and `.metadata` is read with an allow-list
  of DCP's own classes). A tied weight (lm_head = embed_tokens) is stored once.
- state.pt (rank 0): step, data cursor, RNG state and the tied names, read back with
  `torch.load(weights_only=True)`;
- hf/: the model's config.json, generation config and tokenizer, so that `rptfast export`
  makes a HF directory from the checkpoint alone;
- manifest.json, written last: size and SHA-256 of every file (each rank hashes the files it
  wrote, in parallel; rank 0 writes the list).
LoRA runs (model.lora_rank > 0) hold the adapters only, of the policy and of the EMA (the frozen base is
model.path's, unchanged), and the adapters' optimizer state; hf/ also keeps adapter_config.json, so that
`rptfast export` writes peft's adapter folder. Their `final/` is that folder (save_lora), plus `final/merged/`
(a plain HF model, the adapter merged) with model.lora_merged.
Everything is written into `<name>.tmp` and renamed once every rank has finished, so a crash
(or a full disk: DiskFullError, with the tmp directory removed) never leaves a half checkpoint
under a real name. `latest` verifies manifests newest first (the files shared out over the
ranks) and falls back to the previous intact checkpoint, renaming a damaged one to `.damaged`.

Every rank writes into the same directory: across hosts, the run directory must be on a filesystem
that all of them see (as DCP's FileSystemWriter assumes). DCP reshards on load: a checkpoint written
by N ranks resumes on M (bitwise the same run only for M = N: reductions over another number of ranks
add in another order). The HF directory (`final/`, `rptfast export`) is made from a checkpoint by one
process that reads one output file's worth of tensors at a time (rptfast/export.py). What of the model
a checkpoint holds is chosen in one place, `model_state` (an adapter-only checkpoint narrows it there).

Left out: checkpoints of the format before this one (model.safetensors + a full state.pt, rank 0
only) are refused on --resume with what to do: reading them needs the full state on rank 0, which is
what this format removes; `rptfast export` still converts their weights. DCP's async save (training
goes on while a staged copy is written) is not used: the staged copy is a second host copy of the
shard, and the write (20 s for the 0.7B shape's 8 GB here, docs/performance.md) is small beside RL
steps of minutes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from rptfast.distributed import Dist, all_gather_objects, all_sum, barrier, on_main
from rptfast.errors import (
    DiskFullError,
    FileFormatError,
    NonFiniteError,
    PathError,
    atomic_path,
    disk_full_message,
    full_disk_errno,
    remove,
    writing,
)
from rptfast.model import lora

MANIFEST = "manifest.json"
STATE = "state.pt"
HF = "hf"
FORMAT = 2  # 1: model.safetensors + a full state.pt (before DCP)


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of a model: its state dict, sharded as the model is (DTensors under FSDP, no
    gather), tensors that share one storage under their first name only; of a LoRA model the adapters only.
    The one place that chooses it."""
    state = get_model_state_dict(model)
    keep = lora.is_adapter if lora.is_lora(model) else lambda k: k not in tied_names(model)
    return {k: v for k, v in state.items() if keep(k)}


def tied_names(model: torch.nn.Module) -> dict[str, str]:
    """{name: the name it aliases} for parameters registered twice (a tied lm_head is the embedding itself)."""
    first: dict[int, str] = {}
    tied = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        else:
            first[id(p)] = name
    return tied


def train_state(model: torch.nn.Module, optimizer, ema: torch.nn.Module | None, optim: bool = True) -> dict:
    """The sharded tensors a checkpoint holds; loading into them restores the run in place. The optimizer's
    param_groups are left out (they are the config's, the lr a function of the step), and so is its state
    while it has none (`optim` False: no update has run yet, every one skipped, say). DCP's helper would
    make one with a zero-gradient step, and a first real update would then count as AdamW's second."""
    state = {"model": model_state(model)}
    if optim:
        state["optim"] = get_optimizer_state_dict(model, optimizer)["state"]
    if ema is not None:
        state["ema"] = model_state(ema)
    return state


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _leaves(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def refuse_nonfinite(tensors: dict[str, torch.Tensor], where: Path, d: Dist) -> None:
    """NonFiniteError on every rank naming the first tensors with inf or NaN in any rank's shard; one fused
    norm pass over this rank's shards."""
    names = [k for k, v in tensors.items() if v.is_floating_point() and _local(v).numel()]
    norms = torch._foreach_norm([_local(tensors[k]) for k in names]) if names else []
    bad = sorted({k for ranks in all_gather_objects([k for k, n in zip(names, norms) if not torch.isfinite(n)], d)
                  for k in ranks})
    if bad:
        raise NonFiniteError(f"refusing to save {str(where)!r}: {len(bad)} tensors are non-finite "
                             f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); the last complete "
                             f"checkpoint is untouched")


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(d: Path) -> list[str]:
    return sorted(str(f.relative_to(d)) for f in d.rglob("*") if f.is_file() and f.name != MANIFEST)


def _entries(d: Path, names: list[str]) -> dict[str, dict]:
    return {n: {"bytes": (d / n).stat().st_size, "sha256": _sha256(d / n)} for n in names}


def write_manifest(d: Path, files: dict[str, dict]) -> None:
    """The size and SHA-256 of every file, written last under a temporary name and renamed."""
    tmp = d / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=1))
    os.replace(tmp, d / MANIFEST)


def verify(d: Path, rank: int = 0, world: int = 1) -> str | None:
    """None when d matches its manifest, else what is wrong (one phrase). The files are hashed by the `world`
    ranks in turn (this one hashes every world-th, from `rank`); sizes and presence are checked by all."""
    try:
        files = json.loads((d / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return "no manifest.json (its write never finished)"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "manifest.json is damaged"
    for i, (name, want) in enumerate(sorted(files.items())):
        f = d / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {want['bytes']}"
        if i % world == rank and _sha256(f) != want["sha256"]:
            return f"{name} does not match its SHA-256 (the bytes changed after the save)"
    return None


class _Writer(dcp.FileSystemWriter):
    """DCP's writer, with a full disk reported as a plain OSError: DCP sends a rank's failure to the others
    pickled, which drops the OSError that torch.save's own RuntimeError wraps."""

    def write_data(self, plan, planner):
        try:
            return super().write_data(plan, planner)
        except Exception as e:
            code = full_disk_errno(e)
            if code is None:
                raise
            raise OSError(code, os.strerror(code), str(self.path)) from None


# what DCP's `.metadata` pickle refers to: its metadata classes, torch's Size, dtypes and layouts, a Path
_METADATA_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                     ("pathlib", "WindowsPath"), ("pathlib", "Path")}


class _Reader(dcp.FileSystemReader):
    """DCP's reader; `.metadata` (a pickle) unpickled with an allow-list (_METADATA_GLOBALS, DCP's own modules,
    torch dtypes): anything else in it is refused, as torch.load(weights_only=True) would refuse it."""

    def read_metadata(self, *args, **kwargs):
        path = Path(self.path) / ".metadata"

        class Allowed(pickle.Unpickler):
            def find_class(self, module: str, name: str):
                if ((module, name) in _METADATA_GLOBALS or module.startswith("torch.distributed.checkpoint.")
                        or module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
                    return super().find_class(module, name)
                raise FileFormatError(f"{str(path)!r} refers to {module}.{name}, which a checkpoint's metadata "
                                      f"never holds: it is not an rptfast checkpoint, or it was tampered with")

        try:
            with path.open("rb") as f:
                metadata = Allowed(f).load()
        except FileFormatError:
            raise
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
            raise FileFormatError(f"{str(path)!r} is damaged ({e}); resume from another checkpoint") from None
        self.storage_data = metadata.storage_data
        return metadata


@contextlib.contextmanager
def quiet_dcp():
    """DCP warns on every save and load in one process that it assumes one process: it is right."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
        yield


def checkpoint_format(path: Path) -> int:
    if (path / ".metadata").is_file():
        return FORMAT
    if (path / "model.safetensors").is_file():
        return 1
    raise FileFormatError(f"{str(path)!r} is not an rptfast checkpoint (no .metadata, no model.safetensors)")


def save(run_dir: Path, step: int, model: torch.nn.Module, optimizer, extra: dict, d: Dist, keep: int,
         ema: torch.nn.Module | None = None, tokenizer=None) -> Path:
    """Checkpoint `step` (a collective: every rank writes its shards); the lr schedule is a pure function of
    the step, so the step is enough. `tokenizer` goes into hf/ beside the config, for `rptfast export`."""
    final = run_dir / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    state = train_state(model, optimizer, ema, optim=bool(optimizer.state))
    leaves = _leaves(state)
    refuse_nonfinite(leaves, final, d)
    needed = int(all_sum([sum(_local(t).numel() * t.element_size() for t in leaves.values())], d)[0])

    def prepare() -> None:
        remove(tmp)
        tmp.mkdir(parents=True)
        free = shutil.disk_usage(tmp).free
        if free < needed:
            remove(tmp)
            raise DiskFullError(disk_full_message(final, errno.ENOSPC, needed))

    on_main(d, prepare)
    try:
        with writing(final, needed), quiet_dcp():
            dcp.save(state, storage_writer=_Writer(tmp))
        own = [n for n in _files(tmp) if n.startswith(f"__{d.rank}_")]
        files = {k: v for part in all_gather_objects(_entries(tmp, own), d) for k, v in part.items()}

        def finish() -> None:
            with writing(final, needed):
                with (tmp / STATE).open("wb") as f:  # a file object: a full disk surfaces as its OSError
                    torch.save({"format": FORMAT, "step": step, "rng": torch.get_rng_state(),
                                "tied": tied_names(model), **extra}, f)
                model.config.save_pretrained(tmp / HF)
                if getattr(model, "generation_config", None) is not None:
                    model.generation_config.save_pretrained(tmp / HF)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp / HF)
                if lora.is_lora(model):  # what `rptfast export` needs to write peft's adapter folder
                    (tmp / HF / lora.ADAPTER_CONFIG).write_text(json.dumps(lora.adapter_config(model), indent=1))
                write_manifest(tmp, {**files, **_entries(tmp, [n for n in _files(tmp) if n not in files])})
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
            for old in sorted(final.parent.glob("step_*[0-9]"))[:-keep]:
                shutil.rmtree(old)

        on_main(d, finish)
    except BaseException:
        if d.main:
            remove(tmp)  # the last complete checkpoint is untouched
        raise
    barrier(d)
    return final


def latest(run_dir: Path, say: Callable[[str], None] = print, check: bool = True, d: Dist | None = None) -> Path | None:
    """The newest intact checkpoint (a `.tmp` directory is an interrupted write, never read).

    With `check`, each is verified against its manifest, newest first, the hashing shared out over the
    ranks of `d`; a damaged one is renamed (by rank 0) to `<name>.damaged`, kept for inspection and never
    read again, and the previous one is tried.
    """
    rank, world = (0, 1) if d is None else (d.rank, d.world)
    done = sorted((run_dir / "checkpoints").glob("step_*[0-9]"), reverse=True)
    if not check:
        return done[0] if done else None
    for ckpt in done:
        found = all_gather_objects(verify(ckpt, rank, world), d) if d else [verify(ckpt)]
        problems = [p for p in found if p]
        if not problems:
            return ckpt
        if rank == 0:
            shutil.rmtree(ckpt.with_name(ckpt.name + ".damaged"), ignore_errors=True)
            ckpt.rename(ckpt.with_name(ckpt.name + ".damaged"))
        say(f"WARNING checkpoint {ckpt} is damaged ({problems[0]}); renamed to {ckpt.name}.damaged, "
            f"falling back to the previous one")
        if d is not None:
            barrier(d)
    return None


def read(path: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under `keys` (`model.<fqn>`, `ema.<fqn>`, `optim.<fqn>.exp_avg`), whole, in one
    process, whatever number of ranks wrote them: `rptfast export` and tests read a checkpoint this way."""
    saved = _Reader(path).read_metadata().state_dict_metadata
    missing = [k for k in keys if not hasattr(saved.get(k), "chunks")]
    if missing:
        raise FileFormatError(f"{str(path)!r} holds no tensor {missing[0]!r} ({len(missing)} missing)")
    out = {k: torch.empty(saved[k].size, dtype=saved[k].properties.dtype) for k in keys}
    with quiet_dcp():
        dcp.load(out, storage_reader=_Reader(path), no_dist=True)
    return out


def keys(path: Path, prefix: str = "") -> list[str]:
    """The tensor keys a checkpoint holds, those under `prefix` ("model.", "ema.", "optim.")."""
    return [k for k in _Reader(path).read_metadata().state_dict_metadata if k.startswith(prefix)]


def load(path: Path, model: torch.nn.Module, optimizer, d: Dist, ema: torch.nn.Module | None = None) -> dict:
    """Restore weights, optimizer (and the EMA baseline) in place, resharded to this run's ranks; return the
    rest of the saved state (step, cursor, ...)."""
    if checkpoint_format(path) != FORMAT:
        raise PathError(f"{str(path)!r} was written by an older rptfast (model.safetensors + a full state.pt), "
                        f"which --resume no longer reads (it needs the whole state on rank 0); finish the run with "
                        f"the rptfast that started it, or export its weights (rptfast export {path} --out DIR) "
                        f"and start a new run from them (model.path = DIR)")
    state = torch.load(path / STATE, weights_only=True, map_location="cpu")
    saved = _Reader(path).read_metadata().state_dict_metadata
    target = train_state(model, optimizer, ema, optim=any(k.startswith("optim.") for k in saved))
    leaves = _leaves(target)
    wrong = [k for k in leaves if k not in saved or not hasattr(saved[k], "chunks")]
    # and nothing of the model's or the EMA's beyond them (a LoRA run of other targets would load half of it)
    wrong += [k for k in saved if k.split(".", 1)[0] in ("model", "ema") and k not in leaves]
    if wrong:
        raise FileFormatError(f"{str(path)!r} does not match this run at {', '.join(wrong[:3])} ({len(wrong)} in "
                              f"all): it was written for another model or setting (info_gain's ema, LoRA); "
                              f"resume with the config that wrote it")
    with quiet_dcp():
        dcp.load(target, storage_reader=_Reader(path))
    # the model's and the EMA's tensors were loaded in place; the optimizer's go back through its state_dict
    if "optim" in target:
        groups = get_optimizer_state_dict(model, optimizer)["param_groups"]
        set_optimizer_state_dict(model, optimizer, {"state": target["optim"], "param_groups": groups})
    torch.set_rng_state(state.pop("rng"))
    for key in ("format", "tied"):
        state.pop(key)
    return state


def save_lora(out: Path, model: torch.nn.Module, tokenizer, d: Dist, dtype: torch.dtype | None,
              merged: bool) -> Path:
    """A LoRA policy's `final/`: peft's adapter folder (its fp32 adapters, the tokenizer), and with `merged` also
    `merged/`, the HF model with the adapter merged in `dtype` (None: the base's). The adapters are gathered on
    every rank (collectives) and written by the main one; the base is whole on every rank already (LoRA runs
    leave it out of FSDP), so nothing here needs more than one rank holds."""
    tensors = dict(lora.adapter_tensors(model))
    weights = lora.merged_weights(model, dtype or model.dtype) if merged else None

    def write() -> None:
        with atomic_path(out) as tmp:
            tmp.mkdir(parents=True)
            lora.write_adapter(tmp, tensors, lora.adapter_config(model))
            tokenizer.save_pretrained(tmp)
            if weights is not None:
                config_dtype = model.config.dtype
                model.config.dtype = dtype or config_dtype  # what config.json's torch_dtype says
                try:
                    model.save_pretrained(tmp / "merged", state_dict=weights, safe_serialization=True)
                finally:
                    model.config.dtype = config_dtype
                tokenizer.save_pretrained(tmp / "merged")

    refuse_nonfinite({**tensors, **(weights or {})}, out, d)
    on_main(d, write)
    return out
