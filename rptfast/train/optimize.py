"""The update: the kept groups packed into micro-batches, the clipped policy loss, AdamW.

With algorithm.updates_per_batch = K > 1 the batch is cut into K mini-batches, each one optimizer
step; their old log-probs (and the frozen reference's, for the KL) come from no-grad pre-passes.
With K = 1 and old_logprobs = "recompute", the old log-probs are the training forward's own values,
detached (ratio = 1): the same numbers a separate pass would give, for one forward less; and with
model.fused_loss the loss and its gradient come out of the lm_head pass (linear_policy_loss).
"""

from __future__ import annotations

import math

import torch

from rptfast.distributed import all_max, all_sum
from rptfast.kernels import policy_loss
from rptfast.metrics import Timer
from rptfast.model import (
    MicroBatch,
    Sequence,
    collate,
    collate_shared,
    flop_rates,
    forward_flops,
    lora,
    pack,
    pack_shared,
    shares_prompts,
)
from rptfast.train.groups import Group
from rptfast.train.guards import check_finite_state, check_mismatch
from rptfast.train.run import Run
from rptfast.train.schedule import lr_at


def sequences(groups: list[Group], ntp: bool = False) -> list[Sequence]:
    """One sequence per completion; with `ntp`, a group's first also carries its prompt's context span (the
    next-token loss scores each prompt's context once, whichever copy of the prompt a micro-batch holds)."""
    return [Sequence(g.prompt.token_ids + c.token_ids, len(g.prompt.token_ids), float(a), c.logprobs,
                     g.prompt.meta["context_span"] if ntp and j == 0 else None)
            for g in groups for j, (c, a) in enumerate(zip(g.completions, g.advantages))]


def aligned_micro_batches(run: Run, seqs: list[Sequence]) -> list[MicroBatch]:
    """Packed micro-batches; every rank runs the same number (FSDP's collectives pair up), so a
    rank with fewer pads with a masked-out dummy that contributes nothing.

    With train.share_prompts (and a backend that runs the shared mask), sequences with the same
    prompt share it: prompt-once rows (model.pack_shared), the same log-probs and gradients.
    """
    return [mb for _, mb in indexed_micro_batches(run, seqs)]


def indexed_micro_batches(run: Run, seqs: list[Sequence]) -> list[tuple[list[int], MicroBatch]]:
    """aligned_micro_batches with the indices into `seqs` each holds (none for a padding dummy); a micro-batch's
    seq_ids k is sequence idx[k]."""
    padded = run.cfg.train.packing == "padded"
    budget = run.cfg.train.micro_batch_tokens
    if run.cfg.train.share_prompts and not padded and shares_prompts(run.policy.lm):
        bins = pack_shared(seqs, budget) if seqs else []
        out = [(b, collate_shared(seqs, b, run.d.device)) for b in bins]
    else:
        bins = pack(seqs, budget, padded) if seqs else []
        out = [(b, collate(seqs, b, run.d.device, padded=padded)) for b in bins]
    (most,) = all_max([len(bins)], run.d)
    dummy = Sequence([0, 0], 1, 0.0, [0.0])
    while len(out) < most:
        out.append(([], collate([dummy], [0], run.d.device, masked=True)))
    return out


def update(run: Run, groups: list[Group], step: int, timer: Timer) -> dict:
    """Mini-batch updates on the kept groups with the clipped policy loss."""
    cfg, d, a = run.cfg, run.d, run.cfg.algorithm
    K = a.updates_per_batch
    with timer("pack"):
        seqs = sequences(groups, ntp=a.ntp_coef > 0)
        minis = [seqs[i::K] for i in range(K)] if K > 1 else [seqs]
        mbs_per_mini = [aligned_micro_batches(run, m) for m in minis]
        rates = flop_rates(run.policy.lm)
        fwd_flops = sum(forward_flops(rates, mb) for mbs in mbs_per_mini for mb in mbs)
    need_old = a.old_logprobs == "recompute" and K > 1
    old, ref, prepass_tokens = {}, {}, 0
    if need_old or run.ref is not None:
        with timer("logprobs"):
            old, ref, prepass_tokens = prepasses(run, mbs_per_mini, need_old)
    # on-policy batches get the loss and its gradient in the lm_head pass (linear_policy_loss): one matmul less
    fused = cfg.model.fused_loss and cfg.model.logprob == "fused" and K == 1
    sums: dict[str, float] = {}
    mismatch = Mismatch()
    skipped, trained_tokens, grad_norm, loss_total, ntp_loss = 0, 0, 0.0, 0.0, 0.0
    with timer("update"):
        for i, mbs in enumerate(mbs_per_mini):
            for g in run.optimizer.param_groups:
                g["lr"] = lr_at(cfg, step)
            norm_tokens, norm_seqs = all_sum([sum(s.n_scored for s in minis[i]), len(minis[i])], d)
            normalizer = norm_tokens if a.aggregation == "token-mean" else norm_seqs
            (ntp_tokens,) = all_sum([sum(s.context[1] - max(1, s.context[0]) for s in minis[i] if s.context)], d)
            mini_loss = 0.0
            for j, mb in enumerate(mbs):
                loss, m, logp, ent = micro_batch_loss(run, mb, normalizer, old.get((i, j)), ref.get((i, j)), fused,
                                                      ntp_tokens)
                ntp_loss += m.pop("ntp_loss", 0.0)
                # rollout vs trainer on the same tokens, with the weights the rollout used: the
                # pre-pass values, or this forward while no mini-batch has updated the weights yet
                mismatch.add(old.get((i, j), logp.detach() if i == 0 else None), mb)
                # FSDP averages gradients over ranks; the loss is already normalised by the global
                # count, so scale by the world size to get the gradient of the global sum.
                (loss * d.world).backward()
                mini_loss += loss.item()
                trained_tokens += mb.n_tokens
                n_tok = int(mb.mask.sum())
                _accumulate(sums, {**m, "entropy": ent.detach()[mb.mask].float().mean() if n_tok else 0.0}, n_tok)
            (mini_loss,) = all_sum([mini_loss], d)
            norm = clip_grad(run, cfg.train.grad_clip)
            if not (math.isfinite(mini_loss) and math.isfinite(norm)):
                skipped += 1
                run.optimizer.zero_grad(set_to_none=True)
                run.logger.write(f"WARNING step {step + 1}: non-finite loss ({mini_loss}) or grad norm ({norm}); "
                                 f"update skipped, weights untouched")
                continue
            run.optimizer.step()
            check_finite_state(run, step)
            if run.ema is not None:
                ema_update(run.ema, run.policy, a.ema_decay)
            run.optimizer.zero_grad(set_to_none=True)
            loss_total += mini_loss
            grad_norm = max(grad_norm, norm)
    with timer("update"):  # the metrics' reductions are collectives: they belong to the phase
        totals = dict(zip(sums, all_sum(list(sums.values()), d)))
        n_tok = totals.pop("_n", 0) or 1
        metrics = {k: v / n_tok for k, v in totals.items()}
        m_mean, m_max = mismatch.reduce(d)
        metrics.update({"loss": loss_total / max(1, K - skipped), "grad_norm": grad_norm, "lr": lr_at(cfg, step),
                        "skipped": skipped, "mismatch_mean": m_mean, "mismatch_max": m_max,
                        "trained_tokens": all_sum([trained_tokens], d)[0],
                        "prepass_tokens": all_sum([prepass_tokens], d)[0]})
        if a.ntp_coef:  # the mean NLL per context token, averaged over the mini-batches
            metrics["ntp_loss"] = all_sum([ntp_loss], d)[0] / K
        metrics.update(advantage_stats(run, groups))
        # counted FLOPs (model.flop_rates): forward + backward of every micro-batch, forward only per pre-pass; a LoRA
        # backward skips the frozen weights' gradients (one matmul of two; the adapters' FLOPs are not counted)
        n_prepasses = int(need_old) + int(run.ref is not None)
        passes = 2 if lora.is_lora(run.policy.lm) else 3
        metrics["flops/update"], metrics["flops/logprobs"] = all_sum([passes * fwd_flops, n_prepasses * fwd_flops], d)
        # the kept groups' prompts (each once) and completions: prompt-once packing trains P + sum R tokens per
        # group where the unshared one trains G P + sum R
        metrics["prompt_tokens"], metrics["completion_tokens"] = all_sum(
            [sum(len(g.prompt.token_ids) for g in groups), sum(s.n_scored for s in seqs)], d)
    check_mismatch(run, step, m_mean, m_max)
    return metrics


@torch.no_grad()
def prepasses(run: Run, mbs_per_mini: list[list[MicroBatch]], need_old: bool) -> tuple[dict, dict, int]:
    """Old log-probs (need_old) and the reference's, per (mini-batch, micro-batch), when they cannot come
    from the training forward itself; and the tokens these passes ran."""
    T = run.cfg.rollout.temperature
    old: dict[tuple[int, int], torch.Tensor] = {}
    ref: dict[tuple[int, int], torch.Tensor] = {}
    tokens = 0
    for i, mbs in enumerate(mbs_per_mini):
        for j, mb in enumerate(mbs):
            if need_old:
                old[i, j] = run.policy(mb, T)[0]
                tokens += mb.n_tokens
            if run.ref is not None:
                ref[i, j] = run.ref(mb, T)[0]
                tokens += mb.n_tokens
    return old, ref, tokens


def micro_batch_loss(run: Run, mb: MicroBatch, normalizer: float, old: torch.Tensor | None,
                     ref: torch.Tensor | None, fused: bool,
                     ntp_tokens: int = 0) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]:
    """(loss, metrics, logp [R], entropy [R]) of one micro-batch: fused (linear_policy_loss, gradient made in
    the lm_head pass) or two-step (log-probs, then policy_loss). `old`: the pre-pass's old log-probs, or None
    for this forward's own (on-policy); algorithm.old_logprobs = "rollout" takes the engine's instead.

    With algorithm.ntp_coef, the same forward also scores the context tokens of the micro-batch's prompts
    (each prompt once: Sequence.context), and the loss gains ntp_coef x their NLL summed / `ntp_tokens` (the
    mini-batch's context tokens over every rank); metrics["ntp_loss"] is this micro-batch's share of that
    mean NLL (the shares add up to it)."""
    cfg, a = run.cfg, run.cfg.algorithm
    T = cfg.rollout.temperature
    options = dict(eps_low=a.eps_low, eps_high=a.eps_high, dual_clip=a.dual_clip or None, ref_logprobs=ref,
                   kl_coef=a.kl_coef, rollout_logprobs=mb.rollout_logprobs if a.tis_cap else None,
                   tis_cap=a.tis_cap or None, aggregation=a.aggregation, seq_ids=mb.seq_ids, normalizer=normalizer,
                   max_len=cfg.rollout.max_tokens)
    ntp = a.ntp_coef > 0 and mb.ntp_idx is not None
    if fused:  # old log-probs: the engine's, or (None) this forward's own
        old_lp = mb.rollout_logprobs if a.old_logprobs == "rollout" else None
        out = run.policy(mb, T, loss=dict(old_logprobs=old_lp, advantages=mb.advantages, mask=mb.mask,
                                          grad_filter=cfg.model.grad_filter, **options), ntp=ntp)
        loss, m, logp, ent = out[:4]
    else:
        out = run.policy(mb, T, ntp=ntp)
        logp, ent = out[:2]
        old_lp = mb.rollout_logprobs if a.old_logprobs == "rollout" else (old if old is not None else logp.detach())
        loss, m = policy_loss(logp, old_lp, mb.advantages, mb.mask, **options)
    if ntp:
        nll = -out[-1].sum() / max(1, ntp_tokens)
        loss = loss + a.ntp_coef * nll
        m = {**m, "ntp_loss": nll.item()}
    return loss, m, logp, ent


class Mismatch:
    """|rollout - trainer| log-prob per scored token, summed over the step's micro-batches."""

    def __init__(self):
        self.sum, self.max, self.n = 0.0, 0.0, 0

    def add(self, trainer_logp: torch.Tensor | None, mb: MicroBatch) -> None:
        if trainer_logp is None:  # a later mini-batch: the weights moved since the rollout
            return
        diff = (trainer_logp - mb.rollout_logprobs).abs()[mb.mask]
        if diff.numel():
            self.sum += diff.sum().item()
            self.max = max(self.max, diff.max().item())
            self.n += diff.numel()

    def reduce(self, d) -> tuple[float, float]:
        """(mean, max) over every rank."""
        total, n = all_sum([self.sum, self.n], d)
        (worst,) = all_max([self.max], d)
        return total / max(1, n), worst


def advantage_stats(run: Run, groups: list[Group]) -> dict:
    adv = torch.cat([g.advantages for g in groups]) if groups else torch.zeros(0)
    a_n, a_sum, a_sq, a_abs = all_sum([adv.numel(), adv.sum().item(), adv.square().sum().item(),
                                       adv.abs().sum().item()], run.d)
    a_mean = a_sum / max(a_n, 1)
    return {"adv_mean": a_mean, "adv_std": max(a_sq / max(a_n, 1) - a_mean**2, 0.0) ** 0.5,
            "adv_abs_mean": a_abs / max(a_n, 1)}


def _accumulate(sums: dict, m: dict, weight: int) -> None:
    """Token-weighted sums of per-micro-batch means, reduced over ranks later."""
    for k, v in m.items():
        sums[k] = sums.get(k, 0.0) + float(v) * weight
    sums["_n"] = sums.get("_n", 0.0) + weight


@torch.no_grad()
def ema_update(ema: torch.nn.Module, policy: torch.nn.Module, decay: float) -> None:
    """phi <- decay phi + (1 - decay) theta (info_gain's baseline), parameter by parameter, local shards under
    FSDP, in place; both in fp32. LoRA: the adapters only (both models' frozen base is one tensor). Under mixed
    precision FSDP2 leaves the root's parameters unsharded in the compute dtype after a forward with no backward
    (the EMA's scoring pass): resharded first, so that the fp32 shards are what is averaged."""
    for module in (ema, policy):
        if hasattr(module, "reshard"):
            module.reshard()
    local = lambda t: t._local_tensor if hasattr(t, "_local_tensor") else t  # noqa: E731
    params = lambda m: [p for _, p in lora.adapter_params(m)] if lora.is_lora(m) else list(m.parameters())  # noqa: E731
    torch._foreach_lerp_([local(p) for p in params(ema)], [local(p) for p in params(policy)], 1 - decay)


def clip_grad(run: Run, max_norm: float) -> float:
    trained = [p for p in run.policy.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(trained, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)
