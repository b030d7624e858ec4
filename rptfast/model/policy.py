"""The policy as the trainer sees it: one forward of a micro-batch -> log-probs of its scored tokens.

Log-probs of completion tokens come from the final hidden states through `linear_logprob`
(lm_head fused with log-softmax, tiled over the vocabulary), so the [tokens, vocab] logits tensor
is never materialised; on-policy batches get the loss and its gradient in that same pass
(`linear_policy_loss`).
"""

from __future__ import annotations

import torch
from torch import nn

from rptfast.kernels import linear_logprob, linear_policy_loss, reference, selective_logprob
from rptfast.model.attention import PER_SEQ, SHARED, VARLEN, shares_prompts
from rptfast.model.packing import MicroBatch


def hidden_states(lm: nn.Module, mb: MicroBatch) -> torch.Tensor:
    """Final hidden states of a micro-batch, flat: [T, H] packed, [B*L, H] padded (pred_idx indexes it).

    The one place a forward is run on packed rows: backends that read sequence boundaries from
    cu_seqlens get them here; sdpa finds them in the restarting position ids.
    """
    if mb.attention_mask is not None:  # padded [B, L]
        return lm.base_model(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                             position_ids=mb.position_ids).last_hidden_state.flatten(0, 1)  # [B*L, H]
    if mb.shared is not None:
        return _shared_hidden_states(lm, mb)
    kwargs = {}
    if lm.config._attn_implementation in ("flash_attention_2", VARLEN, PER_SEQ):
        kwargs = dict(cu_seq_lens_q=mb.cu_seqlens, cu_seq_lens_k=mb.cu_seqlens,
                      max_length_q=mb.max_len, max_length_k=mb.max_len)
    return lm.base_model(input_ids=mb.input_ids[None], position_ids=mb.position_ids[None],
                         **kwargs).last_hidden_state[0]  # [T, H]


def _shared_hidden_states(lm: nn.Module, mb: MicroBatch) -> torch.Tensor:
    """hidden_states of a prompt-once row: per_seq, varlen and flash get the layout, sdpa a dense [T, T] mask."""
    if not shares_prompts(lm):
        raise ValueError(f"a prompt-once micro-batch needs model.attn = per_seq (CPU), sdpa, varlen or flash (CUDA) "
                         f"and full attention in every layer, not {lm.config._attn_implementation!r}; "
                         "set train.share_prompts = false")
    ids, pos = mb.input_ids[None], mb.position_ids[None]
    if lm.config._attn_implementation != "sdpa":
        return lm.base_model(input_ids=ids, position_ids=pos, **{SHARED: mb.shared}).last_hidden_state[0]  # [T, H]
    mask = mb.shared.dense_mask(mb.input_ids.device)[None, None]  # [1, 1, T, T]
    return lm.base_model(input_ids=ids, position_ids=pos,
                         attention_mask={"full_attention": mask}).last_hidden_state[0]  # [T, H]


class PolicyLogprob(nn.Module):
    """Wraps the HF model so that one forward returns log-probs of scored tokens.

    It is the FSDP root: inside forward, lm_head's weight is unsharded, which is why the
    fused lm_head + log-softmax runs here and not outside the module.

    `logprob` picks how log-probs leave the hidden states: "fused" (linear_logprob, no
    logits tensor), "logits" (lm_head, then the selective_logprob kernel) or "reference"
    (lm_head, then a full fp32 log-softmax): the last two exist for the throughput ablation.

    Under bf16/fp16 compute the lm_head runs in the compute dtype, logits rounded to it, as the
    engine's does (softmax math is fp32 either way); `lm_head_fp32` casts the final hidden
    states and the lm_head weight to fp32 instead (TRL's cast_lm_head_to_fp32), at the cost of an
    fp32 copy of the weight per forward. docs/performance.md has the measured mismatch both ways.
    """

    def __init__(self, lm: nn.Module, logprob: str = "fused", lm_head_fp32: bool = False):
        super().__init__()
        self.lm = lm
        self.logprob = logprob
        self.lm_head_fp32 = lm_head_fp32

    def forward(self, mb: MicroBatch, temperature: float, loss: dict | None = None,
                ntp: bool = False) -> tuple[torch.Tensor, ...]:
        """(logp [R], entropy [R]) of the scored tokens; with `loss` (linear_policy_loss's options, the
        token tensors included), linear_policy_loss's (loss, metrics, logp, entropy) instead, the
        gradient made in this pass (logprob = "fused" only). With `ntp`, one more output: the log-probs
        [C] of the micro-batch's context tokens (mb.ntp_targets, temperature 1: the language model's
        own next-token loss), from the same forward (algorithm.ntp_coef)."""
        hidden = hidden_states(self.lm, mb)  # [T, H]
        weight = self.lm.get_output_embeddings().weight  # [V, H]
        out = self._scored(hidden.index_select(0, mb.pred_idx), weight, mb.targets, temperature, loss)
        if not ntp:
            return out
        h = hidden.index_select(0, mb.ntp_idx)  # [C, H]
        h, w = (h.float(), weight.float()) if self.lm_head_fp32 else (h, weight)
        return *out, linear_logprob(h, w, mb.ntp_targets, 1.0)

    def _scored(self, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                loss: dict | None) -> tuple[torch.Tensor, ...]:
        if self.lm_head_fp32:
            h, weight = h.float(), weight.float()
        if loss is not None:
            if self.logprob != "fused":
                raise ValueError(f"the fused loss needs model.logprob = 'fused', not {self.logprob!r}; "
                                 "set model.fused_loss = false for the logits ablations")
            return linear_policy_loss(h, weight, targets, temperature=temperature, **loss)
        if self.logprob == "fused":
            return linear_logprob(h, weight, targets, temperature, return_entropy=True)
        logits = h @ weight.T  # [R, V]
        if self.logprob == "logits":
            return selective_logprob(logits, targets, temperature, return_entropy=True)
        return reference.selective_logprob(logits.float(), targets, temperature, return_entropy=True)
