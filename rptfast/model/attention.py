"""Attention over packed rows: the backends, and which of them run prompt-once rows.

Packed training (model/packing.py) concatenates sequences into one row of at most
`train.micro_batch_tokens` tokens, with position ids restarting at every sequence, and no
padding. Attention respects sequence boundaries through one of:
- "flash": flash-attn's varlen kernel (transformers' flash_attention_2 reads the
  boundaries from the position ids), when flash-attn is installed;
- "varlen": torch.nn.attention.varlen.varlen_attn on CUDA, registered below as an
  attention function that receives cu_seqlens;
- "sdpa": scaled_dot_product_attention with the block-diagonal causal mask that
  transformers builds from restarting position ids (O(T^2) mask and attention over the
  whole packed row: the CUDA fallback, and the only CUDA backend for fp32);
- "per_seq": causal SDPA on each sequence of the row in turn, registered below: exact, and
  no work on the masked-out blocks (the CPU default, where a packed row of 2,048 tokens of
  short sequences ran 3x slower through the block-diagonal mask than padded).
Prompt-once rows (model/shared_prompt.py) run through per_seq on the CPU, sdpa (a dense mask), and varlen and
flash on CUDA (model/flash_shared.py: two FlashAttention varlen calls merged by log-sum-exp).
"""

from __future__ import annotations

import importlib.util
import inspect

import torch
from torch import nn

from rptfast.errors import ConfigError
from rptfast.model import flash_shared
from rptfast.model.flash_shared import varlen_shared_attention
from rptfast.model.shared_prompt import shared_attention

VARLEN = "rptfast_varlen"  # torch.nn.attention.varlen on CUDA
PER_SEQ = "rptfast_per_seq"  # causal SDPA on each packed sequence in turn (the CPU default)
SHARED = "rptfast_shared"  # keyword that carries a prompt-once row's SharedLayout to the attention function


def torch_varlen_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def resolve_attn(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The transformers attn_implementation for model.attn, for attention computed in `dtype`.

    FlashAttention (flash-attn's and torch's varlen, which calls it) takes fp16 and bf16 only: in fp32
    or fp64 "auto" is SDPA with a block-diagonal mask, and naming flash or varlen is a config error.
    """
    half = dtype in (torch.float16, torch.bfloat16)
    if name in ("flash", "varlen") and device.type == "cuda" and not half:
        raise ConfigError(f"model.attn = {name!r} computes in fp16 or bf16 only (FlashAttention), but the model "
                          f"computes in {str(dtype).removeprefix('torch.')}; set model.dtype = 'bfloat16' or "
                          "model.attn = 'auto' (SDPA)")
    flash = device.type == "cuda" and half and importlib.util.find_spec("flash_attn") is not None
    varlen = device.type == "cuda" and half and torch_varlen_available()
    if name == "auto":
        name = "flash" if flash else "varlen" if varlen else "sdpa" if device.type == "cuda" else "per_seq"
    if name == "flash":
        if not flash:
            raise ConfigError("model.attn = 'flash' needs CUDA and flash-attn (pip install flash-attn); "
                               "use model.attn = 'auto'")
        _register_flash()
        return "flash_attention_2"
    if name == "varlen":
        if not varlen:
            raise ConfigError("model.attn = 'varlen' needs CUDA and torch.nn.attention.varlen (torch >= 2.10); "
                               "use model.attn = 'auto'")
        _register(VARLEN, _varlen_attention())
        return VARLEN
    if name == "per_seq":
        _register(PER_SEQ, _per_seq_attention)
        return PER_SEQ
    return "sdpa"


def _register(name: str, fn) -> None:
    """An attention function that finds sequence boundaries in cu_seqlens, and no mask."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, lambda *args, **kwargs: None)


def _register_flash() -> None:
    """transformers' flash_attention_2, which prompt-once rows bypass for flash_shared (the name stays, so
    transformers' own flash plumbing, which reads it from the config, is unchanged for every other row)."""
    from transformers import AttentionInterface

    original = AttentionInterface()["flash_attention_2"]
    if getattr(original, "runs_shared_rows", False):
        return

    def attention(module, query, key, value, attention_mask, **kwargs):
        layout = kwargs.pop(SHARED, None)
        if layout is not None:
            return varlen_shared_attention(query, key, value, layout, kwargs.get("scaling"))
        return original(module, query, key, value, attention_mask, **kwargs)

    attention.runs_shared_rows = True
    AttentionInterface.register("flash_attention_2", attention)


def _varlen_attention():
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    # torch 2.10 spells causal as is_causal=True, later releases as window_size=(-1, 0)
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if kwargs.get(SHARED) is not None:
            return varlen_shared_attention(query, key, value, kwargs[SHARED], scaling)
        # query [1, Hq, T, D], key/value [1, Hkv, T, D] -> varlen layout [T, H, D]
        cu, max_len = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
        if k.shape[1] != q.shape[1]:  # GQA: one kv head per group of query heads
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        extra = {"scale": scaling} if "scale" in params else {}
        out = varlen_attn(q, k, v, cu, cu, max_len, max_len, **causal, **extra)
        return out[None], None  # [1, T, H, D], as transformers expects from attention functions

    return attention


def _per_seq_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if kwargs.get(SHARED) is not None:
        return shared_attention(query, key, value, kwargs[SHARED], scaling)
    return _per_seq_unshared(query, key, value, scaling, **kwargs)


def _per_seq_unshared(query, key, value, scaling=None, **kwargs):
    """Causal SDPA within each sequence of the packed row: exact, O(sum L^2) rather than the
    O(T^2) of a block-diagonal mask over the whole row. Sequences of equal length go through
    one batched SDPA call (RL batches repeat lengths: G completions per prompt, many cut at
    max_tokens), so the calls per layer are the distinct lengths, not the sequences.

    Without cu_seqlens, one row takes its boundaries from where the position ids restart at 0
    (as the sdpa path does); several rows ([B, L], right-padded) get one causal SDPA: padding
    after the tokens is never attended to by them, so no mask is needed.
    """
    sdpa = torch.nn.functional.scaled_dot_product_attention
    gqa = key.shape[1] != query.shape[1]
    cu = kwargs.get("cu_seq_lens_q")
    pos = kwargs.get("position_ids")
    if cu is None and pos is not None and query.shape[0] == 1:
        starts = (pos[0] == 0).nonzero()[:, 0]
        cu = torch.cat([starts, starts.new_tensor([pos.shape[1]])])
    if cu is None:
        out = sdpa(query, key, value, is_causal=True, scale=scaling, enable_gqa=gqa)  # [B, H, L, D]
        return out.transpose(1, 2), None
    q, k, v = query[0], key[0], value[0]  # [H, T, D]
    starts, lens = cu[:-1].long(), (cu[1:] - cu[:-1]).long()
    out = torch.zeros_like(q)
    for length in lens.unique().tolist():
        first = starts[lens == length]  # [n]
        idx = (first[:, None] + torch.arange(length, device=q.device)).reshape(-1)  # [n * L]
        n = first.numel()
        part = [x.index_select(1, idx).unflatten(1, (n, length)).transpose(0, 1) for x in (q, k, v)]  # [n, H, L, D]
        o = sdpa(*part, is_causal=True, scale=scaling, enable_gqa=gqa)
        out = out.index_copy(1, idx, o.transpose(0, 1).flatten(1, 2))
    return out.transpose(0, 1)[None], None  # [1, T, H, D]


def unshared_reason(lm: nn.Module) -> str | None:
    """Why lm's backend runs prompt-once rows unshared, in one line; None when it shares them.

    sdpa (a dense mask), per_seq on the CPU (_SharedAttention calls the CPU flash kernels), and varlen and flash
    (flash_shared; resolve_attn gives them only on CUDA in fp16 or bf16) share prompts, once flash_shared's
    start-up probe has passed on the device. Models with sliding-window layers or logit softcapping run unshared
    on every backend: the prompt-once attention has neither."""
    layer_types = set(getattr(lm.config, "layer_types", None) or ["full_attention"])
    backend = lm.config._attn_implementation
    if layer_types != {"full_attention"}:
        return f"the model has {', '.join(sorted(layer_types - {'full_attention'}))} layers"
    if getattr(lm.config, "attn_logit_softcapping", None) is not None:
        return "the model softcaps its attention logits"
    if backend == PER_SEQ:
        return None if lm.device.type == "cpu" else f"per_seq shares prompts on the CPU only, not on {lm.device.type}"
    if backend in (VARLEN, "flash_attention_2"):
        failed = flash_shared.probe(lm.device, flash_shared.varlen_kernels())
        return None if failed is None else f"flash_shared's start-up check failed ({failed})"
    if backend == "sdpa":
        return None
    return f"attention backend {backend!r} has no prompt-once path (per_seq on the CPU, sdpa, varlen and flash do)"


def shares_prompts(lm: nn.Module) -> bool:
    """Whether lm's attention backend runs prompt-once rows (see unshared_reason)."""
    return unshared_reason(lm) is None
