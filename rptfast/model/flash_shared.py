"""Prompt-once attention on CUDA: _SharedAttention's two parts through FlashAttention's varlen kernels.

The varlen and flash backends run prompt-once rows (model/shared_prompt.py) here, with two varlen calls per
layer, each to a kernel that returns its log-sum-exp:
- own:   every segment (a prompt or a completion) against its own keys, causal: the row as it lies, cut at the
         segments (SharedLayout.own_varlen);
- cross: each unit's completions, one after another as one query sequence, against its prompt's keys, no mask:
         completion and prompt tokens gathered into contiguous buffers (SharedLayout.cross_q, cross_k, cross_varlen).
Completion tokens take (e^lse_own o_own + e^lse_cross o_cross) / (e^lse_own + e^lse_cross), in fp32 and rounded
once to the compute dtype; prompt tokens keep the own part. Nothing is masked inside a call, so the masked-out
blocks are never computed, and no query is padded.

The backward calls each part's kernel backward with the merged output and the merged log-sum-exp (the identity
ring attention uses): the probabilities a part recomputes, exp(s - lse), are then those of the full softmax over
both parts, and its rowsum(dO * O) term is the full one, so each part returns exactly its share of the gradient.
The cross part's dq, dk, dv are scatter-added onto the own part's in fp32.

Kernels (VarlenKernels, one interface): flash-attn's _flash_attn_varlen_forward/_backward where a flash-attn
with their current interface is installed (window_size_left/right and softcap as arguments: releases after the
varlen log-sum-exp became [Hq, Tq]), else torch's own aten._flash_attention_forward/_backward, which
torch.nn.attention.varlen calls (its varlen_attn returns the log-sum-exp too, but its backward takes only its own
output and log-sum-exp). Both take fewer kv heads than query heads: GQA without repeating K and V. The CPU tests
plug an fp64 stand-in with the same interface into this same code (tests/test_share.py).

Left out: dropout (the trainer sets it to 0), sliding windows and logit softcapping (shares_prompts refuses such
models: the two-part split would need per-part windows, and softcapping changes the scores the merge adds up).
A build that returns the varlen log-sum-exp padded per sequence ([N, Hq, max_q]: ROCm's AOTriton, older
flash-attn) is refused by a shape check rather than merged wrongly.

Start-up probe (`probe`): before the first micro-batch, shares_prompts runs this attention once on a small
prompt-once row and compares it, output and gradients, with a dense masked softmax in fp32. Any failure (an
exception, a log-sum-exp of another shape, wrong numbers) makes shares_prompts false, so the trainer packs each
sequence whole (exact, more tokens) and says why in one line, rather than raising on the first micro-batch.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from collections.abc import Callable
from typing import NamedTuple

import torch

from rptfast.model.shared_prompt import SharedLayout

PROBE_TOL = 0.05  # probe: max error of the output, and relative error of each gradient, vs fp32


class VarlenKernels(NamedTuple):
    """A FlashAttention varlen kernel pair. q [Tq, Hq, D], k/v [Tk, Hkv, D] (Hq a multiple of Hkv), sequences cut
    by cu_q/cu_k [N + 1] int32; causal is aligned bottom-right.

    forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale) -> (out [Tq, Hq, D] in q's dtype, lse [Hq, Tq] fp32)
    backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale) -> (dq, dk, dv), shaped as q, k, v
    """

    name: str
    forward: Callable
    backward: Callable


def _aten_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    # -> (out, logsumexp, rng_state, unused, debug_attn_mask); dropout 0, no debug mask
    out, lse, *_ = torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False,
                                                           scale=scale)
    return out, lse


def _aten_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    # the dropout state (rng_state, unused) is read only under dropout: zeros and an empty tensor, as
    # torch.nn.attention.varlen passes them
    rng_state, unused = q.new_zeros(2, dtype=torch.uint64), q.new_empty(0)
    return torch.ops.aten._flash_attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, causal,
                                                    rng_state, unused, scale=scale)


def _flash_attn_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    from flash_attn.flash_attn_interface import _flash_attn_varlen_forward

    out, lse, _, _ = _flash_attn_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, scale, causal)
    return out, lse


def _flash_attn_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    from flash_attn.flash_attn_interface import _flash_attn_varlen_backward

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)  # written in place; GQA summed there
    _flash_attn_varlen_backward(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k, 0.0, scale, causal,
                                window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None,
                                deterministic=False)
    return dq, dk, dv


ATEN = VarlenKernels("torch aten._flash_attention", _aten_forward, _aten_backward)
FLASH_ATTN = VarlenKernels("flash-attn _flash_attn_varlen", _flash_attn_forward, _flash_attn_backward)


@functools.cache
def varlen_kernels() -> VarlenKernels:
    """flash-attn's kernels where a version with the interface called above is installed, else torch's."""
    if importlib.util.find_spec("flash_attn") is None:
        return ATEN
    try:
        from flash_attn.flash_attn_interface import _flash_attn_varlen_backward
    except ImportError:  # flash-attn without its CUDA extension
        return ATEN
    fn = getattr(_flash_attn_varlen_backward, "_init_fn", _flash_attn_varlen_backward)  # under torch.library.custom_op
    params = inspect.signature(fn).parameters
    return FLASH_ATTN if {"window_size_left", "softcap", "deterministic"} <= params.keys() else ATEN


def varlen_shared_attention(query, key, value, layout: SharedLayout, scaling: float | None = None,
                            kernels: VarlenKernels | None = None):
    """Attention over a prompt-once row (varlen and flash backends): query [1, Hq, T, D], key/value [1, Hkv, T, D]
    -> ([1, T, Hq, D], None), as transformers' attention functions return. See _VarlenShared."""
    q, k, v = (x.squeeze(0).transpose(0, 1) for x in (query, key, value))  # [T, H, D], the varlen layout
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    out = _VarlenShared.apply(q, k, v, layout, scale, kernels or varlen_kernels())  # [T, Hq, D]
    return out.unsqueeze(0), None


def _check_lse(lse: torch.Tensor, q: torch.Tensor, kernels: VarlenKernels) -> None:
    if lse.shape != (q.shape[1], q.shape[0]):
        raise RuntimeError(f"{kernels.name} returned a log-sum-exp of shape {tuple(lse.shape)}, not [Hq, Tq] = "
                           f"{(q.shape[1], q.shape[0])}: this build pads it per sequence, which prompt-once attention "
                           "does not read; set train.share_prompts = false (or model.attn = 'sdpa')")


class _VarlenShared(torch.autograd.Function):
    """The two varlen calls, merged by log-sum-exp; the backward written by hand (see the module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, layout: SharedLayout, scale: float, kernels: VarlenKernels):
        # q [T, Hq, D], k/v [T, Hkv, D]
        acc = torch.promote_types(q.dtype, torch.float32)  # the merge's dtype: fp32 (fp64 for fp64 inputs)
        out, lse = kernels.forward(q, k, v, *layout.own_varlen, True, scale)  # [T, Hq, D], [Hq, T]
        _check_lse(lse, q, kernels)
        cq, ck = layout.cross_q, layout.cross_k  # [Q] completion tokens, [K] their prompts' tokens
        if cq.numel():
            o_x, lse_x = kernels.forward(q.index_select(0, cq), k.index_select(0, ck), v.index_select(0, ck),
                                         *layout.cross_varlen, False, scale)  # [Q, Hq, D], [Hq, Q]
            lse_own = lse.index_select(1, cq)  # [Hq, Q]
            lse_m = torch.logaddexp(lse_own, lse_x)
            w_own, w_x = ((x - lse_m).exp().t().unsqueeze(-1).to(acc) for x in (lse_own, lse_x))  # [Q, Hq, 1]
            merged = w_own * out.index_select(0, cq).to(acc) + w_x * o_x.to(acc)  # [Q, Hq, D]
            out.index_copy_(0, cq, merged.to(out.dtype))  # one rounding to the compute dtype, after the merge
            lse.index_copy_(1, cq, lse_m)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.scale, ctx.kernels = layout, scale, kernels
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse = ctx.saved_tensors
        layout, scale, kernels = ctx.layout, ctx.scale, ctx.kernels
        acc = torch.promote_types(q.dtype, torch.float32)  # the parts' gradients add up in fp32
        dq, dk, dv = kernels.backward(d_out, q, k, v, out, lse, *layout.own_varlen, True, scale)
        dq, dk, dv = dq.to(acc), dk.to(acc), dv.to(acc)
        cq, ck = layout.cross_q, layout.cross_k
        if cq.numel():
            gq, gk, gv = kernels.backward(d_out.index_select(0, cq), q.index_select(0, cq), k.index_select(0, ck),
                                          v.index_select(0, ck), out.index_select(0, cq), lse.index_select(1, cq),
                                          *layout.cross_varlen, False, scale)
            dq.index_add_(0, cq, gq.to(acc))
            dk.index_add_(0, ck, gk.to(acc))
            dv.index_add_(0, ck, gv.to(acc))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


@functools.cache
def probe(device: torch.device, kernels: VarlenKernels, dtype: torch.dtype = torch.bfloat16) -> str | None:
    """None when prompt-once attention through `kernels` works on `device`, else why not,
    in one line. Checked once per (device, kernels, dtype): two units (a 5-token prompt with completions of 3 and 4
    tokens, a 2-token prompt with one of 6), 4 query and 2 kv heads of 64, output and dq, dk, dv against a dense
    masked softmax in fp32. PROBE_TOL is about 10x bf16's rounding of these O(1) values and far below what a wrong
    layout gives (O(1) errors)."""
    try:
        layout = SharedLayout.build([(0, 5, 0, 0), (5, 3, 0, 5), (8, 4, 0, 5), (12, 2, 12, 0), (14, 6, 12, 2)], device)
        g = torch.Generator().manual_seed(0)
        q, d_out = (torch.randn(1, 4, 20, 64, generator=g) for _ in range(2))  # [1, Hq, T, D]
        k, v = (torch.randn(1, 2, 20, 64, generator=g) for _ in range(2))  # [1, Hkv, T, D]
        x = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
        out = varlen_shared_attention(*x, layout, 0.125, kernels)[0]  # [1, T, Hq, D]
        out.backward(d_out.to(device, dtype).transpose(1, 2))
        ref = [t.to(device, torch.float32).requires_grad_() for t in (q, k, v)]
        kr, vr = (t.repeat_interleave(2, 1) for t in ref[1:])  # GQA: each kv head serves 2 query heads
        scores = (ref[0] @ kr.transpose(-1, -2) * 0.125).masked_fill(~layout.dense_mask(device), float("-inf"))
        want = (scores.softmax(-1) @ vr).transpose(1, 2)  # [1, T, Hq, D]
        want.backward(d_out.to(device).transpose(1, 2))
        errors = {"output": (out.float() - want).abs().max().item()}
        for name, a, b in zip(("dq", "dk", "dv"), x, ref):
            errors[name] = ((a.grad.float() - b.grad).norm() / b.grad.norm()).item()
    except Exception as e:  # whatever the build does wrong, the trainer falls back to exact unshared packing
        return f"{kernels.name} failed on {device}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    bad = {k: v for k, v in errors.items() if not v <= PROBE_TOL}  # NaN fails too
    if bad:
        return f"{kernels.name} on {device} disagrees with a dense fp32 softmax: " + ", ".join(
            f"{k} error {v:.3g}" for k, v in bad.items()) + f" (tolerance {PROBE_TOL})"
    return None
