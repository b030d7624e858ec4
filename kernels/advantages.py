"""Group-relative advantages (GRPO): each completion's reward against the other completions of its prompt.

    A = (r - mean_group(r)) / (std_group(r) + eps)     scale="group"
    A = r - mean_group(r)                               scale="none" (Dr. GRPO: no std division)

std is the unbiased one (divides by G - 1), as torch.std and the GRPO implementations built on it
(DeepSeekMath's, TRL's) compute it; with G = 8 it is 7% larger than the biased std. Means and
squared deviations are computed in two passes, in fp32. The kernel also reports whether each group's
rewards are all exactly equal: those groups carry no learning signal (every A is 0), and dynamic
sampling drops them. Their advantages are set to exactly 0: in fp32, r - mean of equal rewards can
be a rounding residue (1e-7 for rewards near 1) that the division by std + eps would blow up to 0.1.

Left out, on purpose: batch-level normalisation (REINFORCE++ style), and group sizes of 1, which are
rejected: a lone completion's advantage is always 0, and its unbiased std is undefined.
"""

import torch
import triton
import triton.language as tl

from ._utils import use_triton

SCALES = ("group", "none")


@triton.jit
def _group_advantages_kernel(
    rewards_ptr,
    adv_ptr,
    all_equal_ptr,
    B,
    G,
    eps,
    SCALE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    groups = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B]
    cols = tl.arange(0, BLOCK_G)  # [BLOCK_G]
    valid = (groups[:, None] < B) & (cols[None, :] < G)  # [BLOCK_B, BLOCK_G]
    offs = groups[:, None] * G + cols[None, :]
    r = tl.load(rewards_ptr + offs, mask=valid, other=0.0)
    mean = tl.sum(r, axis=1) / G  # [BLOCK_B]
    r_max = tl.max(tl.where(valid, r, float("-inf")), axis=1)
    r_min = tl.min(tl.where(valid, r, float("inf")), axis=1)
    all_equal = r_max == r_min  # [BLOCK_B]
    centred = tl.where(valid, r - mean[:, None], 0.0)
    adv = centred
    if SCALE:
        std = tl.sqrt(tl.sum(centred * centred, axis=1) / (G - 1))
        adv = centred / tl.where(all_equal, 1.0, std + eps)[:, None]  # no 0/0 when eps == 0
    tl.store(adv_ptr + offs, tl.where(all_equal[:, None], 0.0, adv), mask=valid)
    tl.store(all_equal_ptr + groups, all_equal.to(tl.uint8), mask=groups < B)


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards [B*G] (G = group_size consecutive completions per prompt) -> (advantages [B*G] fp32,
    all_equal [B] bool).

    rewards may be any real dtype and layout; they are first made a contiguous fp32 vector (a copy of
    B*G numbers at most). group_size must be >= 2 and divide len(rewards). No gradient.
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError("rewards must be a 1-D tensor [B*G], the G completions of each prompt side by side")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(
            f"group_size must be an int >= 2, got {group_size!r}: a group of one completion always has "
            "advantage 0; sample at least 2 completions per prompt"
        )
    if rewards.shape[0] % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide len(rewards)={rewards.shape[0]}; "
            "pass all G completions of every prompt"
        )
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r} is unknown; use 'group' (divide by the group std) or 'none'")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    if rewards.is_complex() or rewards.dtype == torch.bool:
        raise ValueError(f"rewards has dtype {rewards.dtype}; pass real numbers")
    r = rewards.to(torch.float32).contiguous()  # [B*G]
    n_groups = r.shape[0] // group_size
    if not use_triton(r):
        groups = r.view(n_groups, group_size)  # [B, G]
        all_equal = groups.amax(dim=1) == groups.amin(dim=1)  # [B]
        adv = groups - groups.mean(dim=1, keepdim=True)
        if scale == "group":
            adv = adv / (groups.std(dim=1, keepdim=True) + eps)
        return adv.masked_fill(all_equal[:, None], 0.0).reshape(-1), all_equal
    adv = torch.empty_like(r)  # [B*G]
    all_equal = torch.empty(n_groups, dtype=torch.uint8, device=r.device)  # [B]
    if n_groups:
        block_g = max(triton.next_power_of_2(group_size), 2)
        block_b = max(2, min(triton.next_power_of_2(n_groups), 2048 // block_g))  # >= 2: no 1-wide blocks
        _group_advantages_kernel[(triton.cdiv(n_groups, block_b),)](
            r,
            adv,
            all_equal,
            n_groups,
            group_size,
            float(eps),
            SCALE=scale == "group",
            BLOCK_B=block_b,
            BLOCK_G=block_g,
        )
    return adv, all_equal.view(torch.bool)
