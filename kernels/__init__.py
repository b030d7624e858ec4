"""Triton kernels for the RL loss path, installed as rptfast.kernels.

CUDA tensors run compiled Triton kernels; CPU tensors run torch implementations with the same
numerics and memory discipline, or, under TRITON_INTERPRET=1, the Triton kernels in Triton's
interpreter. reference.py holds the plain torch versions that tests and benchmarks compare against.
"""

from .advantages import group_advantages
from .linear_loss import linear_policy_loss
from .lm_head import linear_logprob
from .logprob import selective_logprob
from .loss import fused_policy_loss_from_logits, policy_loss
from .topk import topk_entropy

__all__ = [
    "fused_policy_loss_from_logits",
    "group_advantages",
    "linear_logprob",
    "linear_policy_loss",
    "policy_loss",
    "selective_logprob",
    "topk_entropy",
]
