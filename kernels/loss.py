"""Clipped policy-gradient loss (PPO/GRPO family) with its gradient in the same pass, and the same
loss fused with selective_logprob over the logits.

Per token t (all in fp32):
    ratio = exp(logp - old)
    pg    = max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high))
    pg    = min(pg, -A * c)                     where A < 0, with dual clip c > 1
    pg   *= min(exp(old - rollout), tis_cap)    truncated importance weight (detached)
    l_t   = pg + kl_coef * (exp(ref - logp) - (ref - logp) - 1)     k3 KL to a reference
    loss  = sum_t w_t * l_t
Every aggregation is folded into the per-token weights w_t on the host (token_weights), so the
kernel is one elementwise pass that writes w_t * l_t and w_t * d l_t / d logp; the loss is their sum
and the backward one multiply. Masked tokens have w_t = 0 and contribute exactly 0 (their values are
never used, so NaN or inf there cannot leak).

Edge cases, one behaviour on every path (the Triton code compiled or interpreted, and the torch twin):
- A token with A = 0 has pg = 0 and d pg / d logp = 0, its limit for any ratio: exp(logp - old) can
  overflow to inf (old = -inf, or a gap over 88 nats), and -0 * inf is NaN in IEEE arithmetic. Before,
  the torch path gave NaN there and the Triton path a finite loss (tl.maximum dropped the NaN).
- Otherwise a NaN reaches the token's loss on every path: the Triton min/max propagate NaN as torch's
  do (by default tl.maximum returns the other operand, which hid a NaN ratio behind the clip bound),
  so the trainer's non-finite check sees the same thing on a GPU as on the CPU.

Left out, on purpose: value/critic terms (GRPO has no critic), an entropy bonus (selective_logprob
returns a differentiable entropy for that), gradients to anything but the log-probs (the old,
reference and rollout log-probs and the advantages are data).
"""

import torch
import triton
import triton.language as tl

from ._utils import (
    backward_warps,
    check_ids,
    check_logits,
    check_targets,
    check_temperature,
    compute_dtype,
    use_triton,
    vocab_block,
)
from .logprob import (
    _softmax_stats,
    _write_logprob_grad,
    _write_zero_row,
    selective_logprob_backward,
    selective_logprob_forward,
)

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
BLOCK_TOKENS = 1024


@triton.jit
def _token_loss(
    logp,
    old,
    adv,
    weight,
    ref,
    rollout,
    eps_low,
    eps_high,
    dual_clip,
    kl_coef,
    tis_cap,
    DUAL_CLIP: tl.constexpr,
    KL: tl.constexpr,
    TIS: tl.constexpr,
):
    """(w * l, w * dl/dlogp) for scalars or blocks of tokens; 0 where w == 0."""
    # min/max with propagate_nan=ALL: NaN in, NaN out, as torch.maximum and clamp do (module docstring)
    ratio = tl.exp(logp - old)
    live = adv != 0.0  # A = 0: pg = 0 for any ratio, inf included (-0 * inf would be NaN)
    pg_unclipped = tl.where(live, -adv * ratio, 0.0)
    clipped = tl.maximum(ratio, 1.0 - eps_low, propagate_nan=tl.PropagateNan.ALL)
    clipped = tl.minimum(clipped, 1.0 + eps_high, propagate_nan=tl.PropagateNan.ALL)
    pg_clipped = tl.where(live, -adv * clipped, 0.0)
    pg = tl.maximum(pg_unclipped, pg_clipped, propagate_nan=tl.PropagateNan.ALL)
    # d(-A * ratio)/d logp = -A * ratio; the clipped branch only wins outside the clip range, where it
    # is constant (inside the range both branches are equal and carry the same gradient); NaN stays NaN
    dpg = tl.where(pg_unclipped >= pg_clipped, pg_unclipped, pg * 0.0)
    if DUAL_CLIP:
        dual = (adv < 0) & (pg > -adv * dual_clip)
        pg = tl.where(dual, -adv * dual_clip, pg)
        dpg = tl.where(dual, 0.0, dpg)
    if TIS:
        tis = tl.minimum(tl.exp(old - rollout), tis_cap, propagate_nan=tl.PropagateNan.ALL)
        pg = pg * tis
        dpg = dpg * tis
    loss = pg
    dloss = dpg
    if KL:
        diff = ref - logp
        e = tl.exp(diff)
        loss += kl_coef * (e - diff - 1.0)
        dloss += kl_coef * (1.0 - e)
    active = weight != 0.0
    return tl.where(active, weight * loss, 0.0), tl.where(active, weight * dloss, 0.0)


@triton.jit
def _policy_loss_kernel(
    logp_ptr,
    old_ptr,
    adv_ptr,
    weight_ptr,
    ref_ptr,
    rollout_ptr,
    loss_ptr,
    dlogp_ptr,
    N,
    eps_low,
    eps_high,
    dual_clip,
    kl_coef,
    tis_cap,
    DUAL_CLIP: tl.constexpr,
    KL: tl.constexpr,
    TIS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    logp = tl.load(logp_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    weight = tl.load(weight_ptr + offs, mask=valid, other=0.0)
    ref = old  # unused unless KL
    if KL:
        ref = tl.load(ref_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    rollout = old  # unused unless TIS
    if TIS:
        rollout = tl.load(rollout_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    loss, dlogp = _token_loss(
        logp,
        old,
        adv,
        weight,
        ref,
        rollout,
        eps_low,
        eps_high,
        dual_clip,
        kl_coef,
        tis_cap,
        DUAL_CLIP,
        KL,
        TIS,
    )
    tl.store(loss_ptr + offs, loss, mask=valid)
    tl.store(dlogp_ptr + offs, dlogp, mask=valid)


@triton.jit
def _fused_policy_loss_kernel(
    logits_ptr,
    stride_row,
    targets_ptr,
    old_ptr,
    adv_ptr,
    weight_ptr,
    ref_ptr,
    rollout_ptr,
    logp_ptr,
    loss_ptr,
    V,
    inv_temp,
    eps_low,
    eps_high,
    dual_clip,
    kl_coef,
    tis_cap,
    DUAL_CLIP: tl.constexpr,
    KL: tl.constexpr,
    TIS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One row: logsumexp pass, the token's loss and d loss / d logp, then d loss / d logits in place.

    A masked row (w == 0) is not read at all: zeros are written (and logp = loss = 0). A row whose
    d loss / d logp is 0 (clipped, or dual-clipped) skips the gradient pass's read the same way.
    """
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    weight = tl.load(weight_ptr + row)
    if weight != 0.0:
        target = tl.load(targets_ptr + row)
        # The race fix: the target logit is loaded BEFORE the log-sum-exp pass, not after it. The pass ends
        # with cross-warp reductions (a barrier each), so every warp holds this value before any warp leaves
        # the pass and starts overwriting the row with the gradient; loaded after the pass, a late warp
        # could read a gradient already stored there (the sm_90 PTX had no barrier in between). Chosen
        # over Liger's tl.debug_barrier() after the pass: no extra barrier per row, and the scalar load's
        # latency hides behind the pass instead of stalling between the two passes.
        z_target = tl.load(row_ptr + target).to(tl.float32) * inv_temp
        lse, _ = _softmax_stats(row_ptr, V, inv_temp, False, BLOCK_V)
        logp = z_target - lse
        old = tl.load(old_ptr + row).to(tl.float32)
        adv = tl.load(adv_ptr + row).to(tl.float32)
        ref = old  # unused unless KL
        if KL:
            ref = tl.load(ref_ptr + row).to(tl.float32)
        rollout = old  # unused unless TIS
        if TIS:
            rollout = tl.load(rollout_ptr + row).to(tl.float32)
        loss, dlogp = _token_loss(
            logp,
            old,
            adv,
            weight,
            ref,
            rollout,
            eps_low,
            eps_high,
            dual_clip,
            kl_coef,
            tis_cap,
            DUAL_CLIP,
            KL,
            TIS,
        )
        tl.store(logp_ptr + row, logp)
        tl.store(loss_ptr + row, loss)
        if dlogp != 0.0:
            _write_logprob_grad(row_ptr, row_ptr, V, target, lse, 0.0, dlogp, 0.0, inv_temp, False, BLOCK_V)
        else:
            _write_zero_row(row_ptr, V, BLOCK_V)
    else:
        tl.store(logp_ptr + row, 0.0)
        tl.store(loss_ptr + row, 0.0)
        _write_zero_row(row_ptr, V, BLOCK_V)


def _token_loss_torch(logp, old, adv, weight, ref, rollout, eps_low, eps_high, dual_clip, kl_coef, tis_cap):
    """Torch twin of _token_loss (same formulas, same order), for the CPU path."""
    ratio = torch.exp(logp - old)
    live = adv != 0
    pg_unclipped = torch.where(live, -adv * ratio, 0.0)
    pg_clipped = torch.where(live, -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high), 0.0)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    dpg = torch.where(pg_unclipped >= pg_clipped, pg_unclipped, pg * 0.0)
    if dual_clip is not None:
        dual = (adv < 0) & (pg > -adv * dual_clip)
        pg = torch.where(dual, -adv * dual_clip, pg)
        dpg = torch.where(dual, 0.0, dpg)
    if tis_cap is not None:
        tis = torch.exp(old - rollout).clamp(max=tis_cap)
        pg = pg * tis
        dpg = dpg * tis
    loss, dloss = pg, dpg
    if ref is not None and kl_coef != 0.0:
        diff = ref - logp
        e = torch.exp(diff)
        loss = loss + kl_coef * (e - diff - 1.0)
        dloss = dloss + kl_coef * (1.0 - e)
    active = weight != 0
    return torch.where(active, weight * loss, 0.0), torch.where(active, weight * dloss, 0.0)


def _kernel_flags(opts: dict) -> dict:
    """constexpr flags and float scalars for the Triton kernels (unused scalars passed as 0)."""
    return dict(
        eps_low=opts["eps_low"],
        eps_high=opts["eps_high"],
        dual_clip=opts["dual_clip"] or 0.0,
        kl_coef=opts["kl_coef"],
        tis_cap=opts["tis_cap"] or 0.0,
        DUAL_CLIP=opts["dual_clip"] is not None,
        KL=opts["ref"] is not None and opts["kl_coef"] != 0.0,
        TIS=opts["tis_cap"] is not None,
    )


def policy_loss_forward(logp, old, adv, weight, opts: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(w * l [N], w * dl/dlogp [N]) for flat contiguous token vectors; fp32 (fp64 on the fp64 torch path)."""
    n = logp.shape[0]
    if use_triton(logp):
        loss = torch.empty(n, dtype=torch.float32, device=logp.device)  # [N]
        dlogp = torch.empty_like(loss)  # [N]
        if n:
            ref = opts["ref"] if opts["ref"] is not None else logp
            rollout = opts["rollout"] if opts["rollout"] is not None else logp
            _policy_loss_kernel[(triton.cdiv(n, BLOCK_TOKENS),)](
                logp,
                old,
                adv,
                weight,
                ref,
                rollout,
                loss,
                dlogp,
                n,
                **_kernel_flags(opts),
                BLOCK=BLOCK_TOKENS,
            )
        return loss, dlogp
    dtype = compute_dtype(logp.dtype)
    cast = lambda t: None if t is None else t.to(dtype)
    return _token_loss_torch(
        cast(logp),
        cast(old),
        cast(adv),
        cast(weight),
        cast(opts["ref"]),
        cast(opts["rollout"]),
        opts["eps_low"],
        opts["eps_high"],
        opts["dual_clip"],
        opts["kl_coef"],
        opts["tis_cap"],
    )


class PolicyLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old, adv, weight, opts):
        loss, dlogp = policy_loss_forward(logp, old, adv, weight, opts)
        ctx.save_for_backward(dlogp)
        ctx.logp_dtype = logp.dtype
        return loss.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        (dlogp,) = ctx.saved_tensors
        return (dlogp * grad_loss).to(ctx.logp_dtype), None, None, None, None


def token_weights(
    mask: torch.Tensor,
    seq_ids: torch.Tensor | None,
    n_seqs: int | torch.Tensor,
    aggregation: str,
    normalizer: float | torch.Tensor | None,
    max_len: int | None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """w [N] such that loss = sum_t w_t * l_t reproduces the aggregation; 0 on masked tokens.

    n_seqs (S) may be a 0-d device tensor: nothing here reads a value back to the host, so the loss can
    be captured in a CUDA graph and never stalls the stream.
    """
    m = mask.to(dtype)  # [N]
    if isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.to(device=m.device, dtype=dtype)
    if aggregation == "token-mean":
        return m / (normalizer if normalizer is not None else m.sum().clamp(min=1))
    seqs = normalizer if normalizer is not None else n_seqs
    if aggregation == "seq-mean-token-sum-norm":
        return m / (max_len * seqs)
    # kept tokens of each token's sequence without an [S] buffer (whose size S would have to be read back):
    # sort the ids, count kept tokens by prefix sums, and look each token's id range up in the sorted ids
    sorted_ids, order = seq_ids.sort()  # [N]
    kept = torch.nn.functional.pad(mask[order].to(torch.int64).cumsum(0), (1, 0))  # [N + 1] kept before each
    lo = torch.searchsorted(sorted_ids, seq_ids, side="left")  # [N]
    hi = torch.searchsorted(sorted_ids, seq_ids, side="right")  # [N]
    counts = (kept[hi] - kept[lo]).to(dtype)  # [N] kept tokens in the token's sequence
    return m / (counts.clamp(min=1) * seqs)


@torch.no_grad()
def policy_metrics(logp, old, adv, mask, opts: dict) -> dict[str, torch.Tensor]:
    """Detached fp32 scalars over the unmasked tokens (0 when there are none):
    clip_frac_low   fraction with A < 0 and ratio < 1 - eps_low (lower clip active, no gradient)
    clip_frac_high  fraction with A > 0 and ratio > 1 + eps_high (upper clip active, no gradient)
    ratio_mean      mean of exp(logp - old)
    dual_clip_frac  (dual_clip given) fraction with A < 0 and the clipped loss above -A * dual_clip
    kl_mean         (ref_logprobs given) mean k3 KL, exp(ref - logp) - (ref - logp) - 1
    tis_weight_mean (tis_cap given) mean truncated importance weight min(exp(old - rollout), tis_cap)
    """
    m = mask
    count = m.sum().clamp(min=1).float()
    mean = lambda x: torch.where(m, x.float(), 0.0).sum() / count
    logp, old, adv = logp.float(), old.float(), adv.float()
    ratio = torch.exp(logp - old)
    out = {
        "clip_frac_low": mean((adv < 0) & (ratio < 1 - opts["eps_low"])),
        "clip_frac_high": mean((adv > 0) & (ratio > 1 + opts["eps_high"])),
        "ratio_mean": mean(ratio),
    }
    if opts["dual_clip"] is not None:
        pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - opts["eps_low"], 1 + opts["eps_high"]))
        out["dual_clip_frac"] = mean((adv < 0) & (pg > -adv * opts["dual_clip"]))
    if opts["ref"] is not None:
        diff = opts["ref"].float() - logp
        out["kl_mean"] = mean(torch.exp(diff) - diff - 1)
    if opts["tis_cap"] is not None:
        out["tis_weight_mean"] = mean(torch.exp(old - opts["rollout"].float()).clamp(max=opts["tis_cap"]))
    return out


def _check_number(name: str, value, low: float, *, strict: bool = True, high: float | None = None) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > low if strict else value >= low) and (high is None or value < high)
    if not ok:
        bound = f"> {low}" if strict else f">= {low}"
        bound += f" and < {high}" if high is not None else ""
        raise ValueError(f"{name} must be a number {bound}, got {value!r}")
    return float(value)


def _prepare(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    *,
    eps_low,
    eps_high,
    dual_clip,
    ref_logprobs,
    kl_coef,
    rollout_logprobs,
    tis_cap,
    aggregation,
    seq_ids,
    normalizer,
    max_len,
    weight_dtype=torch.float32,
    lead="logprobs",
):
    """Checks everything, flattens to contiguous [N] vectors, folds the aggregation into weights.

    Returns (old, adv, mask, weight, opts), all flat; opts also carries the flat ref/rollout. `lead` names
    the tensor that sets the shape, for the error messages.
    Token vectors are made contiguous (O(N) copies at most, negligible next to the logits).
    """
    if not isinstance(logprobs, torch.Tensor) or logprobs.dim() not in (1, 2):
        raise ValueError(f"{lead} must be a [B, L] (one row per sequence) or flat [N] (packed) tensor")
    shape, device = logprobs.shape, logprobs.device
    named = {
        "old_logprobs": old_logprobs,
        "advantages": advantages,
        "mask": mask,
        "ref_logprobs": ref_logprobs,
        "rollout_logprobs": rollout_logprobs,
    }
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.shape != shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"{name} has shape {got} but {lead} has {tuple(shape)}; give every token tensor the "
                "same shape (broadcast sequence advantages to tokens first)"
            )
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but {lead} is on {device}; move it there")
        if name != "mask" and not t.is_floating_point():
            raise ValueError(f"{name} has dtype {t.dtype}; pass floating point values")
    allowed = (torch.bfloat16, torch.float16, torch.float32)
    if not use_triton(logprobs):
        allowed += (torch.float64,)
    for name, t in ((lead, logprobs), *named.items()):
        if name != "mask" and t is not None and t.dtype not in allowed:
            raise ValueError(f"{name} has dtype {t.dtype}; the kernels take bf16, fp16 or fp32")

    eps_low = _check_number("eps_low", eps_low, 0.0, strict=False, high=1.0)
    eps_high = _check_number("eps_high", eps_high, 0.0, strict=False)
    if dual_clip is not None:
        dual_clip = _check_number("dual_clip", dual_clip, 1.0)
    kl_coef = _check_number("kl_coef", kl_coef, 0.0, strict=False)
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs; pass the reference model's log-probs or kl_coef=0")
    if (rollout_logprobs is None) != (tis_cap is None):
        raise ValueError("truncated importance sampling needs both rollout_logprobs and tis_cap; pass both or neither")
    if tis_cap is not None:
        tis_cap = _check_number("tis_cap", tis_cap, 0.0)
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r} is unknown; use one of {', '.join(AGGREGATIONS)}")
    if aggregation == "seq-mean-token-sum-norm":
        if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len <= 0:
            raise ValueError(
                f"aggregation='seq-mean-token-sum-norm' needs max_len, a positive int (the constant "
                f"Dr. GRPO divides each sequence's token sum by), got {max_len!r}"
            )
    if normalizer is not None and not isinstance(normalizer, torch.Tensor):
        normalizer = _check_number("normalizer", normalizer, 0.0)

    n_seqs = 0
    if logprobs.dim() == 2:
        if seq_ids is not None:
            raise ValueError("seq_ids is only for flat [N] inputs; with [B, L] inputs each row is a sequence")
        rows, cols = shape
        n_seqs = rows
        if aggregation != "token-mean":
            seq_ids = torch.arange(rows, device=device).repeat_interleave(cols)  # [N]
    elif aggregation != "token-mean" or seq_ids is not None:
        if seq_ids is None:
            raise ValueError(
                f"aggregation={aggregation!r} with flat [N] inputs needs seq_ids [N] (int64 in [0, S)); "
                "pass the packed sequence index of each token"
            )
        if not isinstance(seq_ids, torch.Tensor) or seq_ids.shape != shape or seq_ids.dtype != torch.int64:
            raise ValueError(f"seq_ids must be an int64 tensor of shape {tuple(shape)} (one id per token)")
        if seq_ids.device != device:
            raise ValueError(f"seq_ids is on {seq_ids.device} but {lead} is on {device}; move it there")
        if seq_ids.numel():
            check_ids(seq_ids, seq_ids >= 0, "seq_ids has negative ids; ids must be in [0, S)")
            n_seqs = seq_ids.max() + 1  # 0-d, stays on the device (S only scales the weights)
        seq_ids = seq_ids.contiguous()

    flat = lambda t: None if t is None else t.reshape(-1).contiguous()
    m = flat(mask) != 0 if mask.dtype != torch.bool else flat(mask)
    weight = token_weights(m, seq_ids, n_seqs, aggregation, normalizer, max_len, weight_dtype)
    opts = dict(
        eps_low=eps_low,
        eps_high=eps_high,
        dual_clip=dual_clip,
        kl_coef=kl_coef,
        tis_cap=tis_cap,
        ref=flat(ref_logprobs),
        rollout=flat(rollout_logprobs),
    )
    return flat(old_logprobs), flat(advantages), m, weight, opts


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    rollout_logprobs: torch.Tensor | None = None,
    tis_cap: float | None = None,
    aggregation: str = "token-mean",
    seq_ids: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    max_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy loss and metrics; the gradient flows to `logprobs` only.

    Layout: all token tensors share one shape, [B, L] (row = sequence) or flat [N] (packed, with
    seq_ids [N] int64 in [0, S) for the seq-mean aggregations; S = max id + 1, and an id without
    tokens counts as an empty sequence). mask is bool (or numbers, nonzero = keep). advantages are
    per token (broadcast sequence advantages first).

    Aggregations (masked tokens excluded everywhere; all-masked sequences add 0 but still count):
      token-mean               sum of token losses / (normalizer or number of unmasked tokens)
      seq-mean-token-mean      sum over sequences of (their token mean) / (normalizer or S)
      seq-mean-token-sum-norm  sum over sequences of (their token sum / max_len) / (normalizer or S)
    normalizer is the global count (tokens for token-mean, sequences otherwise): with it, the losses
    of micro-batches or ranks sum to the loss of the whole batch, gradients included.

    Returns (loss, metrics): loss a 0-d fp32 tensor, metrics as policy_metrics documents.
    """
    old, adv, m, weight, opts = _prepare(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        eps_low=eps_low,
        eps_high=eps_high,
        dual_clip=dual_clip,
        ref_logprobs=ref_logprobs,
        kl_coef=kl_coef,
        rollout_logprobs=rollout_logprobs,
        tis_cap=tis_cap,
        aggregation=aggregation,
        seq_ids=seq_ids,
        normalizer=normalizer,
        max_len=max_len,
        weight_dtype=compute_dtype(logprobs.dtype),
    )
    logp = logprobs.reshape(-1).contiguous()
    loss = PolicyLossFunction.apply(logp, old, adv, weight, opts)
    return loss, policy_metrics(logp.detach(), old, adv, m, opts)


def fused_policy_loss_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    rollout_logprobs: torch.Tensor | None = None,
    tis_cap: float | None = None,
    aggregation: str = "token-mean",
    seq_ids: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    max_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """policy_loss(selective_logprob(logits, targets, temperature), ...) in one pass over the logits,
    which are OVERWRITTEN with d loss / d logits (in their dtype).

    logits [N, V] (bf16/fp16/fp32, unit stride along V, any row stride) is destroyed: on return it
    holds the gradient, masked rows included (zeros). Token tensors are flat [N]; the loss options are
    policy_loss's. Returns (loss, metrics) with a detached loss: the gradient is already computed.
    The caller continues backprop from the buffer, e.g.

        logits = model(x)                                      # [N, V], in an autograd graph
        loss, metrics = fused_policy_loss_from_logits(logits, targets, old, adv, mask)
        logits.backward(logits)                                # gradient = the buffer itself

    This is valid when the op that produced the logits does not save its output for its own
    backward (a matmul does not; tanh soft-capping does, and autograd then raises on the changed
    version counter rather than compute a wrong gradient). Traffic: the logits are read twice and
    written once, except masked rows (written with zeros, never read, so NaN or inf there cannot leak)
    and rows whose d loss / d logp is 0 (read once); memory: O(N) floats. No host sync: bad targets or
    seq_ids stop a CUDA run through a device-side assert.
    """
    check_logits(logits)
    if logits.stride(1) != 1:
        raise ValueError(
            "logits must have unit stride along V, since the gradient is written in place; "
            "pass logits.contiguous() (and backprop from that tensor)"
        )
    n_rows, vocab = logits.shape
    check_targets(targets, n_rows, vocab, logits.device)
    if not isinstance(old_logprobs, torch.Tensor) or old_logprobs.shape != (n_rows,):
        raise ValueError(
            f"old_logprobs must be a flat tensor of shape ({n_rows},), one value per row of logits; "
            "the fused loss takes the packed [N] layout"
        )
    temperature = check_temperature(temperature)
    old, adv, m, weight, opts = _prepare(
        old_logprobs,
        old_logprobs,
        advantages,
        mask,
        eps_low=eps_low,
        eps_high=eps_high,
        dual_clip=dual_clip,
        ref_logprobs=ref_logprobs,
        kl_coef=kl_coef,
        rollout_logprobs=rollout_logprobs,
        tis_cap=tis_cap,
        aggregation=aggregation,
        seq_ids=seq_ids,
        normalizer=normalizer,
        max_len=max_len,
        weight_dtype=compute_dtype(logits.dtype),
        lead="old_logprobs",
    )
    targets = targets.contiguous()
    buf = logits.detach()
    if use_triton(buf):
        logp = torch.empty(n_rows, dtype=torch.float32, device=buf.device)  # [N]
        loss_tok = torch.empty_like(logp)  # [N]
        if n_rows:
            ref = opts["ref"] if opts["ref"] is not None else old
            rollout = opts["rollout"] if opts["rollout"] is not None else old
            block = vocab_block(vocab)
            _fused_policy_loss_kernel[(n_rows,)](
                buf,
                buf.stride(0),
                targets,
                old,
                adv,
                weight,
                ref,
                rollout,
                logp,
                loss_tok,
                vocab,
                1.0 / temperature,
                **_kernel_flags(opts),
                BLOCK_V=block,
                num_warps=backward_warps(block, buf.device),
            )
    else:
        logp, lse, _ = selective_logprob_forward(buf, targets, temperature, False)
        loss_tok, dlogp = policy_loss_forward(logp, old, adv, weight, opts)
        selective_logprob_backward(buf, targets, lse, None, dlogp, None, temperature, out=buf)
    return loss_tok.sum(), policy_metrics(logp, old, adv, m, opts)
