"""Plain torch references for every kernel: the one source of truth for tests and benchmarks.

Written for clarity, not speed or memory: they materialise [N, V] tensors and loop over sequences.
Each computes in the dtype of its inputs, so the same function gives both the fp64 gold (fp64
inputs) and "torch at the kernel's dtype" (the baseline whose own error sets the test tolerances).
Gradients come from autograd.
"""

import torch


def selective_logprob(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, return_entropy: bool = False
):
    """log_softmax(logits / T)[target] per row (and the entropy of softmax(logits / T))."""
    logp_all = torch.log_softmax(logits / temperature, dim=-1)  # [N, V]
    logp = logp_all.gather(-1, targets.long()[:, None]).squeeze(-1)  # [N]
    if not return_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # [N]
    return logp, entropy


def linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    """selective_logprob of hidden @ weight.T (the lm_head)."""
    return selective_logprob(hidden @ weight.T, targets, temperature, return_entropy)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6):
    """(r - group mean) / (unbiased group std + eps), or r - group mean; and whether a group is all equal."""
    r = rewards.view(-1, group_size)  # [B, G]
    adv = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    all_equal = (r == r[:, :1]).all(dim=1)  # [B]
    return adv.reshape(-1), all_equal


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
):
    """Clipped policy-gradient loss; see rptfast.kernels.policy_loss for the full contract."""
    if logprobs.dim() == 2:
        rows, cols = logprobs.shape
        seq_ids = torch.arange(rows, device=logprobs.device)[:, None].expand(rows, cols).reshape(-1)
    flat = lambda t: None if t is None else t.reshape(-1)
    lp, old, adv = flat(logprobs), flat(old_logprobs), flat(advantages)
    ref, rollout = flat(ref_logprobs), flat(rollout_logprobs)
    m = flat(mask).bool()

    ratio = torch.exp(lp - old)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps_low, 1 + eps_high))
    if dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip), pg)
    if tis_cap is not None:
        tis = torch.exp(old - rollout).clamp(max=tis_cap)
        pg = pg * tis
    per_token = pg
    if ref is not None:
        kl = torch.exp(ref - lp) - (ref - lp) - 1
        per_token = per_token + kl_coef * kl
    per_token = torch.where(m, per_token, torch.zeros_like(per_token))

    if aggregation == "token-mean":
        denom = normalizer if normalizer is not None else m.sum().clamp(min=1)
        loss = per_token.sum() / denom
    else:
        n_seqs = int(seq_ids.max()) + 1
        seq_losses = []
        for s in range(n_seqs):
            sel = seq_ids == s
            if aggregation == "seq-mean-token-mean":
                seq_losses.append(per_token[sel].sum() / m[sel].sum().clamp(min=1))
            else:  # seq-mean-token-sum-norm (Dr. GRPO)
                seq_losses.append(per_token[sel].sum() / max_len)
        loss = torch.stack(seq_losses).sum() / (normalizer if normalizer is not None else n_seqs)

    with torch.no_grad():
        count = max(int(m.sum()), 1)
        mean = lambda x: x[m].float().sum() / count
        a, r = adv.detach(), ratio.detach()
        metrics = {
            "clip_frac_low": mean((a < 0) & (r < 1 - eps_low)),
            "clip_frac_high": mean((a > 0) & (r > 1 + eps_high)),
            "ratio_mean": mean(r),
        }
        if dual_clip is not None:
            unclipped_dual = torch.maximum(-a * r, -a * r.clamp(1 - eps_low, 1 + eps_high))
            metrics["dual_clip_frac"] = mean((a < 0) & (unclipped_dual > -a * dual_clip))
        if ref is not None:
            metrics["kl_mean"] = mean(kl.detach())
        if tis_cap is not None:
            metrics["tis_weight_mean"] = mean(tis.detach())
    return loss, metrics


def policy_loss_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    **loss_options,
):
    """policy_loss of selective_logprob(logits, targets, temperature), flat [N] layout."""
    logprobs = selective_logprob(logits, targets, temperature)
    return policy_loss(logprobs, old_logprobs, advantages, mask, **loss_options)


def linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    **loss_options,
):
    """policy_loss of linear_logprob(hidden, weight, targets, temperature), flat [N] layout;
    old_logprobs=None: the log-probs themselves, detached (on-policy)."""
    logprobs = linear_logprob(hidden, weight, targets, temperature)
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    return policy_loss(logprobs, old, advantages, mask, **loss_options)


def topk_entropy(logits: torch.Tensor, k: int = 16) -> torch.Tensor:
    """Entropy of softmax over the k largest logits of each row."""
    top = logits.topk(k, dim=-1).values  # [N, k]
    logp = torch.log_softmax(top, dim=-1)
    return -(logp.exp() * logp).sum(-1)
