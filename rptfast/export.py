"""`rptfast export CKPT --out DIR`: a checkpoint as a HF model directory that transformers and vLLM load.

The run's `final/` is this, made from its last checkpoint. One process reads the checkpoint's
`model.*` tensors (DCP, any number of ranks wrote them) one output file's worth at a time,
casts them to the final dtype and writes safetensors files of at most `shard_bytes`
(`model.safetensors`, or `model-0000k-of-0000n.safetensors` and their index), then the config
(its torch_dtype set) and the tokenizer the checkpoint keeps in hf/. Peak memory: one output
file, never the model, its moments or the EMA. A tied lm_head is not written (the checkpoint
stores the embedding once; config.json's tie_word_embeddings makes both loaders tie it), as
save_pretrained does. Everything goes under a temporary name, renamed when complete.

A LoRA run's checkpoint holds the adapters only: its export is peft's adapter folder (adapter_model.safetensors,
adapter_config.json, the tokenizer), for the run's model.path.

A checkpoint of the older format (model.safetensors + state.pt, no hf/) is read too: its
weights are HF-named already; the config and tokenizer come from the run's model directory.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import torch
from safetensors.torch import save_file

from rptfast.checkpoint import HF, _Reader, checkpoint_format, keys, read, verify
from rptfast.errors import FileFormatError, NonFiniteError, PathError, atomic_path
from rptfast.model import lora

SHARD_BYTES = 5 * 10**9  # HF's classic shard size


def export(ckpt: str | Path, out: str | Path, dtype: torch.dtype | None = None,
           shard_bytes: int = SHARD_BYTES) -> Path:
    """Write the HF directory `out` from the checkpoint directory `ckpt`; dtype None keeps the masters'."""
    ckpt, out = Path(ckpt), Path(out)
    if not ckpt.is_dir():
        raise PathError(f"checkpoint {str(ckpt)!r} is not a directory; give a run's checkpoints/step_NNNNNN")
    problem = verify(ckpt)
    if problem:
        raise FileFormatError(f"checkpoint {str(ckpt)!r} is damaged ({problem}); export another one")
    if checkpoint_format(ckpt) == 1:
        return _export_v1(ckpt, out, dtype)
    if (ckpt / HF / lora.ADAPTER_CONFIG).is_file():
        return _export_adapter(ckpt, out)
    saved = _Reader(ckpt).read_metadata().state_dict_metadata
    shapes = {k.removeprefix("model."): md for k, md in saved.items() if k.startswith("model.")}
    files, size = [[]], 0
    for name, md in shapes.items():
        nbytes = md.size.numel() * (dtype or md.properties.dtype).itemsize
        if files[-1] and size + nbytes > shard_bytes:
            files.append([])
            size = 0
        files[-1].append(name)
        size += nbytes
    total = sum(md.size.numel() * (dtype or md.properties.dtype).itemsize for md in shapes.values())
    with atomic_path(out, needed=total) as tmp:
        tmp.mkdir(parents=True)
        index = {}
        for i, names in enumerate(files, 1):
            part = read(ckpt, [f"model.{n}" for n in names])
            tensors = {n: part[f"model.{n}"].to(dtype or part[f"model.{n}"].dtype) for n in names}
            bad = [n for n, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
            if bad:
                raise NonFiniteError(f"exporting {str(ckpt)!r} to {dtype}: {', '.join(bad[:3])} overflow it; "
                                     f"export in the masters' dtype (train.final_dtype = \"float32\")")
            fname = "model.safetensors" if len(files) == 1 else f"model-{i:05d}-of-{len(files):05d}.safetensors"
            save_file(tensors, tmp / fname, metadata={"format": "pt"})
            index.update(dict.fromkeys(names, fname))
        if len(files) > 1:
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2))
        _config_and_tokenizer(ckpt / HF, tmp, dtype)
    return out


def _export_adapter(ckpt: Path, out: Path) -> Path:
    """A LoRA run's checkpoint (adapters only): peft's adapter folder, fp32 (its base is the run's model.path,
    which `PeftModel.from_pretrained` or vLLM's LoRARequest loads it onto)."""
    names = [k.removeprefix("model.") for k in keys(ckpt, "model.")]
    part = read(ckpt, [f"model.{n}" for n in names])
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        lora.write_adapter(tmp, {lora.file_name(n): part[f"model.{n}"] for n in names},
                           json.loads((ckpt / HF / lora.ADAPTER_CONFIG).read_text()))
        for f in (ckpt / HF).iterdir():  # the tokenizer, as the run's final/ keeps it
            if f.is_file() and f.name not in (lora.ADAPTER_CONFIG, "config.json", "generation_config.json"):
                shutil.copy2(f, tmp / f.name)
    return out


def _config_and_tokenizer(src: Path, dst: Path, dtype: torch.dtype | None) -> None:
    """Every file of the HF folder but the weights, config.json's torch_dtype set to the weights' dtype."""
    from transformers import AutoConfig

    for f in src.iterdir():
        if f.is_file() and f.name != "config.json" and not f.name.startswith("model") and f.suffix != ".bin":
            shutil.copy2(f, dst / f.name)
    config = AutoConfig.from_pretrained(src)
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(dst)


def _export_v1(ckpt: Path, out: Path, dtype: torch.dtype | None) -> Path:
    """The older format: model.safetensors (a tied name in its metadata) beside state.pt; the config and the
    tokenizer from the run's model.path (or init/ for a scratch model), as its config.toml says."""
    from safetensors.torch import load_file

    run_dir = ckpt.parent.parent
    try:
        model_path = tomllib.loads((run_dir / "config.toml").read_text())["model"]["path"] or str(run_dir / "init")
    except (OSError, KeyError, tomllib.TOMLDecodeError) as e:
        raise PathError(f"checkpoint {str(ckpt)!r} is of the older format, whose config and tokenizer live in the "
                        f"run's model directory, and {str(run_dir / 'config.toml')!r} does not name it ({e})") from None
    # a tied name was written once, the other in the file's metadata: the file is already what HF expects
    weights = {k: v.to(dtype or v.dtype) for k, v in load_file(ckpt / "model.safetensors").items()}
    with atomic_path(out, needed=sum(t.numel() * t.element_size() for t in weights.values())) as tmp:
        tmp.mkdir(parents=True)
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        _config_and_tokenizer(Path(model_path), tmp, dtype)
    return out
