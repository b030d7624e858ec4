"""The clipped policy loss straight from hidden states and the lm_head, its gradient made in the forward.

Torch, plainly (reference.linear_policy_loss): logits = hidden @ weight.T [N, V], log_softmax, gather,
policy_loss, then autograd: the [N, V] logits, an fp32 log-softmax and its gradient all exist at once.
Two-step here (linear_logprob + policy_loss): flat memory, but four matmuls (logits, the logits again
in the backward, grad_hidden, grad_weight), and grad_weight rounded to bf16 once per row tile.

Here: the per-token loss weights are known before the forward (token_weights folds the aggregation and
the normalizer in), so d loss / d logits can be written while each tile of logits is live. Rows whose
weight is 0 (masked tokens) are left out first: only the M scored rows are gathered, tile by tile, and
grad_hidden is scattered back, zero at the masked rows. Per tile of scored rows:
    h           = hidden[scored rows of the tile]           index_select, [rows, H]
    tile        = h @ weight.T                          matmul 1, into a reused [rows, V] buffer
    one pass    : logsumexp and entropy, logp, the token loss and d loss / d logp, then
                  tile <- -dlogp * p / T in place       (the Triton kernel below; torch on the CPU)
    grad_hidden = tile @ weight + (dlogp / T) * weight[targets]          matmul 2, scattered back
    grad_weight += tile.T @ h, then += (dlogp / T) * h at the targets    matmul 3, fp32 accumulator
The target's +dlogp / T term (the one-hot part of d logp / d logits) goes through a gather and an
index_add in fp32 rather than through the bf16 tile, so the tile holds only the dense -p part, which is
what gradient filtering looks at. The backward only scales the saved gradients by grad_output.

Masked rows: leaving them out (rather than multiplying their zero weight in) saves their three matmuls,
and a NaN or inf in a masked row's hidden state (hence its logits) cannot reach a gradient: in a matmul
0 x NaN is NaN, so a zero row of the tile would still poison grad_weight through h. It costs one host
sync per call (the count M of scored rows sizes the tiles), nothing next to the matmuls, but the call
cannot be captured in a CUDA graph. The detached logp and entropy are 0 at masked rows (not computed).

fp16: the token weights are ~1/N under token-mean (N counted over every micro-batch and rank), and
w * dlogp * p written into an fp16 tile falls below fp16's normal range (6.1e-5) for most entries. The
row pass therefore takes w / s, with s the power of two at or below max w: the tile holds values of the
size of d loss / d logp, the fp32 accumulators are multiplied by s (exact, a power of two), and for
fp16 inputs the gradients stay fp32 until the backward has multiplied them by grad_output (a GradScaler
loss scale), then round once. bf16 shares fp32's exponent range, so its gradients round in the forward.

Determinism: index_add_ on CUDA adds with atomics, in an order that varies between runs (fp32 rounding
only). Under torch.use_deterministic_algorithms(True), torch itself runs index_add_ as
index_put_(accumulate=True): a stable sort of the targets, then each target's rows summed in row order
(aten/src/ATen/native/cuda/Indexing.cu, index_add_cuda_impl; listed in use_deterministic_algorithms'
documentation), so no second path is needed here: the row kernel has no atomics, the gathers and
scatters touch each element once, and the matmuls are cuBLAS's (deterministic with
CUBLAS_WORKSPACE_CONFIG set, which torch requires in that mode).

FLOPs: three matmuls, 6*M*H*V for M scored rows of N, against 2*N*H*V + 6*M*H*V for the two-step path
(its forward cannot know which rows its caller will mask). Bytes, in passes over the bf16 logits
(2*M*V bytes each): matmul 1 writes the tile, the row pass reads it twice and writes it once, matmuls 2
and 3 read it: 6 passes, against 7 for the two-step path (which writes it twice). grad_weight's
fp32 accumulator is read and written once per tile (8*V*H bytes, against 4*V*H for the bf16 one the
two-step path rounds per tile), so the fused path uses tiles CUDA_TILE_SCALE times larger: at N=32768,
H=4096, V=151936, 10 tiles move 50 GB of accumulator against the two-step path's 43 x 2.5 = 107 GB.
Memory beyond inputs and gradients: one tile (1 GiB on CUDA) and its gathered rows of hidden, the fp32
[V, H] accumulator (4*V*H bytes), O(N) floats; the gradients are held from the forward to the backward
(in fp32 for fp16 inputs: 2*(N + V)*H bytes more).

Gradient filtering (grad_filter=True, CCE-style; off by default, see docs/performance.md): blocks of
FILTER_ROWS x FILTER_COLS of the tile whose softmax values are all below bf16 resolution
(finfo(bf16).eps / 32 = 2^-12, CCE's threshold) are zeroed before matmuls 2 and 3. The target term is
never filtered. This implements the numerics of filtering and counts the blocks it would skip; the
speed needs a block-sparse matmul for 2 and 3 (cuBLAS cannot skip blocks), left out until a GPU
measurement says the filtered fraction at real shapes pays for it.

Left out, on purpose: a bias (lm_heads have none); gradients to anything but hidden and weight (the
old, reference and rollout log-probs and the advantages are data); the two-step path's differentiable
logp and entropy (they come back detached, for metrics: an entropy bonus needs the two-step path);
a single Triton kernel fusing the matmuls with the row pass (cuBLAS reaches the matmul rate; the tile
round trip is about 4 tile passes, 10-20% of the matmul time at H = 4096-2048 on an H100).
"""

import torch
import triton
import triton.language as tl

from ._utils import check_targets, check_temperature, compute_dtype, cpu_rows, use_triton, vocab_block, vocab_warps
from .lm_head import check_linear_inputs, tile_rows
from .logprob import _softmax_stats, selective_logprob_forward
from .loss import _kernel_flags, _prepare, _token_loss, policy_loss_forward, policy_metrics

# CUDA tile budget, in multiples of lm_head.CUDA_TILE_BYTES (1 GiB: ~3456 rows at V=151936 in bf16). Each
# tile reads and writes the fp32 grad_weight accumulator once (8*V*H bytes, 5 GB at H=4096), and the
# GEMM that does it has K = rows: with 768-row tiles it would be bound by that traffic, not by its FLOPs.
CUDA_TILE_SCALE = 4

# Gradient filtering granularity: a block of rows x vocabulary columns is skipped as a whole, as a
# block-sparse backward matmul would skip it (one output tile of a typical Triton matmul).
FILTER_ROWS = 64
FILTER_COLS = 128


def filter_eps(dtype: torch.dtype) -> float:
    """Softmax values below this are below the resolution of a gradient in `dtype` (2^-12 for bf16)."""
    return torch.finfo(torch.bfloat16 if dtype in (torch.float32, torch.float64) else dtype).eps / 32


@triton.jit
def _linear_loss_rows_kernel(
    tile_ptr,
    stride_row,
    targets_ptr,
    old_ptr,
    adv_ptr,
    weight_ptr,
    ref_ptr,
    rollout_ptr,
    logp_ptr,
    entropy_ptr,
    loss_ptr,
    dlogp_ptr,
    V,
    inv_temp,
    eps_low,
    eps_high,
    dual_clip,
    kl_coef,
    tis_cap,
    ON_POLICY: tl.constexpr,
    DUAL_CLIP: tl.constexpr,
    KL: tl.constexpr,
    TIS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One scored row of logits (masked rows never get here): logsumexp + entropy pass, the token's loss,
    then -dlogp * p / T in place."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = tile_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    # The target logit is loaded BEFORE the stats pass, not after it: the pass ends in cross-warp
    # reductions (a barrier each), so every warp holds it before any warp leaves the pass and starts
    # overwriting the row below. Loaded after the pass, a late warp could read a value another warp had
    # already replaced (no barrier separates the two in the sm_90 PTX). kernels/loss.py does the same.
    z_target = tl.load(row_ptr + target).to(tl.float32) * inv_temp
    lse, entropy = _softmax_stats(row_ptr, V, inv_temp, True, BLOCK_V)
    logp = z_target - lse
    old = logp  # on-policy: the old log-probs are this forward's own, detached
    if not ON_POLICY:
        old = tl.load(old_ptr + row).to(tl.float32)
    adv = tl.load(adv_ptr + row).to(tl.float32)
    weight = tl.load(weight_ptr + row)
    ref = old  # unused unless KL
    if KL:
        ref = tl.load(ref_ptr + row).to(tl.float32)
    rollout = old  # unused unless TIS
    if TIS:
        rollout = tl.load(rollout_ptr + row).to(tl.float32)
    loss, dlogp = _token_loss(
        logp, old, adv, weight, ref, rollout, eps_low, eps_high, dual_clip, kl_coef, tis_cap, DUAL_CLIP, KL, TIS
    )
    tl.store(logp_ptr + row, logp)
    tl.store(entropy_ptr + row, entropy)
    tl.store(loss_ptr + row, loss)
    tl.store(dlogp_ptr + row, dlogp)
    scale = -dlogp * inv_temp
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        in_row = cols < V
        z = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32) * inv_temp
        tl.store(row_ptr + cols, (scale * tl.exp(z - lse)).to(tile_ptr.dtype.element_ty), mask=in_row)


def _rows_torch(tile, targets, old, adv, weight, opts, temperature):
    """Torch twin of the row kernel, on the CPU: (logp, entropy, loss, dlogp) [n]; tile <- -dlogp * p / T."""
    logp, lse, entropy = selective_logprob_forward(tile, targets, temperature, True)
    loss, dlogp = policy_loss_forward(logp, logp if old is None else old, adv, weight, opts)
    inv_temp = 1.0 / temperature
    step = cpu_rows(tile.shape[1])
    for start in range(0, tile.shape[0], step):
        rows = slice(start, start + step)
        p = (tile[rows].to(lse.dtype) * inv_temp - lse[rows, None]).exp_()  # [r, V] fp32 sub-tile
        tile[rows] = p.mul_(-dlogp[rows, None] * inv_temp)
    return logp, entropy, loss, dlogp


def _row_pass(tile, targets, old, adv, weight, opts, temperature):
    """The row pass over a tile of scored rows: (logp, entropy, loss, dlogp) [n] fp32 (fp64 on the fp64
    torch path), and tile <- -dlogp * p / T in place. old=None: on-policy. Token tensors are [n]."""
    if not use_triton(tile):
        return _rows_torch(tile, targets, old, adv, weight, opts, temperature)
    n, vocab = tile.shape
    logp = torch.empty(n, dtype=torch.float32, device=tile.device)  # [n]
    entropy, loss, dlogp = (torch.empty_like(logp) for _ in range(3))  # [n] each
    block = vocab_block(vocab)
    _linear_loss_rows_kernel[(n,)](
        tile, tile.stride(0), targets, adv if old is None else old, adv, weight,
        adv if opts["ref"] is None else opts["ref"], adv if opts["rollout"] is None else opts["rollout"],
        logp, entropy, loss, dlogp, vocab, 1.0 / temperature, **_kernel_flags(opts), ON_POLICY=old is None,
        BLOCK_V=block, num_warps=vocab_warps(block),
    )  # fmt: skip
    return logp, entropy, loss, dlogp


def _filter_blocks(tile: torch.Tensor, dlogp: torch.Tensor, temperature: float, eps: float) -> tuple[int, int]:
    """Zeroes the FILTER_ROWS x FILTER_COLS blocks of tile (= -dlogp * p / T) where every p < eps.

    p is read back from the tile as |tile| * T / |dlogp| (rows with dlogp = 0 are zero already).
    Returns (blocks zeroed, blocks in all).
    """
    n, v = tile.shape
    nb, vb = triton.cdiv(n, FILTER_ROWS), triton.cdiv(v, FILTER_COLS)
    thresh = (dlogp.abs() * (eps / temperature)).to(torch.float32)[:, None]  # [n, 1]
    hot = tile.abs().to(torch.float32) > thresh  # [n, V]; rows with dlogp = 0 are all cold
    hot = torch.nn.functional.pad(hot, (0, vb * FILTER_COLS - v, 0, nb * FILTER_ROWS - n))
    keep = hot.view(nb, FILTER_ROWS, vb, FILTER_COLS).any(dim=3).any(dim=1)  # [nb, vb]
    full = keep.repeat_interleave(FILTER_ROWS, 0)[:n].repeat_interleave(FILTER_COLS, 1)[:, :v]  # [n, V]
    tile.mul_(full)
    return int((~keep).sum()), nb * vb


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with fp32 (or fp64) accumulation and no rounding of the product to a's dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _rows(t: torch.Tensor | None, rows) -> torch.Tensor | None:
    """t[rows] (a slice), or the rows at the indices `rows`; None stays None."""
    if t is None:
        return None
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)


def _pow2_at_or_below(x: torch.Tensor) -> torch.Tensor:
    """0-d tensor: the largest power of two <= x (x > 0, 0-d), found on x's device (no host sync)."""
    _, exponent = torch.frexp(x)  # x = m * 2^e with m in [0.5, 1)
    return torch.ldexp(torch.ones_like(x), exponent - 1)


class LinearPolicyLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, old, adv, tok_weight, opts, temperature, grad_filter):
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        device = hidden.device
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        acc_dtype = compute_dtype(hidden.dtype)
        # fp16 gradients are rounded only after the backward's multiply by grad_output (module docstring)
        keep_dtype = acc_dtype if hidden.dtype == torch.float16 else hidden.dtype
        scored = tok_weight.nonzero().squeeze(1)  # [M] rows with a loss weight; the one host sync
        n_scored = scored.numel()
        w = tok_weight.index_select(0, scored)  # [M]
        scale = torch.ones((), dtype=acc_dtype, device=device)  # s: the tile holds w / s * (d l / d logits)
        if n_scored:
            scale = _pow2_at_or_below(w.abs().amax().to(acc_dtype))
        w = w / scale
        targets_s, old_s, adv_s = (_rows(t, scored) for t in (targets, old, adv))  # [M] each
        opts_s = {**opts, "ref": _rows(opts["ref"], scored), "rollout": _rows(opts["rollout"], scored)}
        out = torch.empty(4, n_scored, dtype=acc_dtype, device=device)  # logp, entropy, loss, dlogp [M] each
        grad_hidden = torch.zeros(hidden.shape, dtype=keep_dtype, device=device) if need_hidden else None
        acc = torch.zeros(weight.shape, dtype=acc_dtype, device=device) if need_weight else None  # [V, H]
        filtered = torch.zeros(2, dtype=torch.int64)  # blocks zeroed, blocks seen
        eps = filter_eps(hidden.dtype)
        rows = tile_rows(n_scored, vocab, hidden.element_size(), device, CUDA_TILE_SCALE)
        if grad_filter:  # filter blocks at the same rows on every device: tiles of whole FILTER_ROWS blocks
            rows = max(1, min(max(rows // FILTER_ROWS, 1) * FILTER_ROWS, n_scored))
        buf = torch.empty(rows, vocab, dtype=hidden.dtype, device=device)  # [rows, V]
        inv_temp = 1.0 / temperature
        for start in range(0, n_scored, rows):
            chunk = slice(start, start + rows)
            idx = scored[chunk]  # [n] rows of hidden in this tile
            h = hidden.index_select(0, idx)  # [n, H]
            tile = torch.mm(h, weight.t(), out=buf[: h.shape[0]])  # [n, V]
            chunk_opts = {**opts_s, "ref": _rows(opts_s["ref"], chunk), "rollout": _rows(opts_s["rollout"], chunk)}
            rows_out = _row_pass(
                tile, targets_s[chunk], _rows(old_s, chunk), adv_s[chunk], w[chunk], chunk_opts, temperature
            )
            for i, values in enumerate(rows_out):
                out[i, chunk] = values
            dlogp = out[3, chunk]
            if grad_filter:
                filtered += torch.tensor(_filter_blocks(tile, dlogp, temperature, eps))
            coef = (dlogp * inv_temp)[:, None]  # [n, 1] the one-hot term of d loss / d logits
            if need_hidden:
                gh = torch.zeros(h.shape, dtype=acc_dtype, device=device)  # [n, H]
                _accumulate(gh, tile, weight)
                gh += coef * weight.index_select(0, targets_s[chunk]).to(acc_dtype)
                grad_hidden.index_copy_(0, idx, (gh * scale).to(keep_dtype))
            if need_weight:
                _accumulate(acc, tile.t(), h)
                acc.index_add_(0, targets_s[chunk], coef * h.to(acc_dtype))
        logp, entropy = (torch.zeros(n_rows, dtype=acc_dtype, device=device) for _ in range(2))  # [N], 0 if masked
        logp.index_copy_(0, scored, out[0])
        entropy.index_copy_(0, scored, out[1])
        grad_weight = None if acc is None else acc.mul_(scale).to(keep_dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = hidden.dtype, weight.dtype
        ctx.mark_non_differentiable(logp, entropy, filtered)
        return out[2].sum() * scale, logp, entropy, filtered

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        grad_hidden, grad_weight = ctx.saved_tensors

        def scale(g, dtype):
            # out of place (a retained graph may be backpropagated again, as benchmarks do); an fp32 g (fp16
            # inputs) is multiplied in fp32 and rounded once, on the way into the fp16 result
            if g is None:
                return None
            return torch.mul(g, grad_loss.to(g.dtype), out=torch.empty(g.shape, dtype=dtype, device=g.device))

        return scale(grad_hidden, ctx.dtypes[0]), scale(grad_weight, ctx.dtypes[1]), *(None,) * 7


def linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor | None,
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
    grad_filter: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """policy_loss(linear_logprob(hidden, weight, targets, temperature), ...) in one pass over the vocabulary.

    hidden [N, H] and weight [V, H] (the full lm_head weight, not transposed) as linear_logprob takes
    them; targets and every token tensor flat [N] (the packed layout); the loss options are
    policy_loss's. old_logprobs=None means on-policy: the old log-probs are this forward's own,
    detached (ratio 1), as the trainer uses with one update per batch.
    grad_filter zeroes the gradient blocks whose softmax is below bf16 resolution (CCE-style).

    Masked rows (mask false: loss weight 0) are left out of every matmul: their gradients are exactly 0,
    whatever their hidden states hold (NaN or inf included), at the cost of one host sync per call.
    Deterministic under torch.use_deterministic_algorithms(True) (module docstring).

    Returns (loss, metrics, logp, entropy): loss a 0-d fp32 tensor whose gradient flows to hidden and
    weight (computed in the forward, so a second backward through it is not supported); metrics as
    policy_loss's, plus grad_filtered_frac (the share of the scored rows' gradient blocks zeroed) with
    grad_filter; logp and entropy [N] fp32, detached, 0 at masked rows.
    """
    check_linear_inputs(hidden, weight)
    n_rows = hidden.shape[0]
    check_targets(targets, n_rows, weight.shape[0], hidden.device)
    if not isinstance(advantages, torch.Tensor) or advantages.shape != (n_rows,):
        raise ValueError(
            f"advantages must be a flat tensor of shape ({n_rows},), one value per row of hidden; "
            "the fused linear loss takes the packed [N] layout"
        )
    temperature = check_temperature(temperature)
    old, adv, m, tok_weight, opts = _prepare(
        advantages,
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
        weight_dtype=compute_dtype(hidden.dtype),
        lead="advantages",
    )
    loss, logp, entropy, filtered = LinearPolicyLossFunction.apply(
        hidden, weight, targets.contiguous(), old, adv, tok_weight, opts, temperature, bool(grad_filter)
    )
    metrics = policy_metrics(logp, logp if old is None else old, adv, m, opts)
    if grad_filter:
        metrics["grad_filtered_frac"] = filtered[0].float() / filtered[1].clamp(min=1).float()
    return loss, metrics, logp, entropy
