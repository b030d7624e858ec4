"""Loading the policy: an HF causal LM from a directory or hub name, its dtypes, or a scratch model."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rptfast.errors import FileFormatError, PathError, check_model_path


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype that model.dtype names ("auto": bf16 on CUDA, fp32 on the CPU)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def native_dtype(path: str, trust_remote_code: bool) -> torch.dtype:
    """The dtype a HF model directory says its weights are in (config.json's torch_dtype; fp32 if unset)."""
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def load_policy(path: str, *, dtype: torch.dtype, attn: str, trust_remote_code: bool,
                gradient_checkpointing: bool):
    """An HF causal LM from a directory or hub name, with the attention backend set."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    check_model_path(path, "model.path")  # a missing local path is never tried on the hub
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn,
                                                     trust_remote_code=trust_remote_code)
    except SafetensorError as e:
        raise FileFormatError(f"cannot load model {path!r}: a weights file is corrupt ({e}); download or save "
                              f"the model again") from None
    except OSError as e:
        raise PathError(f"cannot load model {path!r}: {e}. Give a HF model directory or a hub name "
                        f"(model.path)") from None
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    # training mode (checkpointing only recomputes there) without dropout: the engine samples
    # from the dropout-free function, so that is the one the trainer must score
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
    return model


def write_scratch_model(out: Path, model_cfg, seed: int) -> Path:
    """A randomly initialised model of a standard architecture for from-scratch training (parity, toy)."""
    from rptfast.model.scratch import make_tiny_model

    heads = model_cfg.scratch_heads
    vocab = 32 if model_cfg.scratch_tokenizer in ("char", "toy") else 512
    return make_tiny_model(out, model_cfg.scratch_arch, vocab=vocab, layers=model_cfg.scratch_layers, seed=seed,
                           tokenizer=model_cfg.scratch_tokenizer, hidden=64 * heads, heads=heads,
                           kv_heads=heads, intermediate=4 * 64 * heads, init_std=0.02)
