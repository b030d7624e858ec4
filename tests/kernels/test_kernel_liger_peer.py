"""linear_policy_loss against Liger-Kernel's LigerFusedLinearGRPOLoss on the same tokens, both against fp64.

Liger's chunked GRPO loss is torch (a custom autograd function over vocabulary chunks, the loss math optionally
under torch.compile), so it runs on the CPU too, uncompiled. It serves here as a second implementation at the
kernel's dtype: ours must be within twice Liger's own error against the fp64 reference (plus the floor), on
irregular shapes, on- and off-policy, with the k3 KL term; bench/liger_peer.py holds the argument mapping that
bench/gpu.py --part owed times on a GPU.
"""

import sys
from pathlib import Path

import pytest
import torch
from kernel_checks import DEVICE, assert_close

pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel is a dev dependency (pyproject: dev extra)")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
try:
    import liger_peer
finally:
    sys.path.pop(0)


def _off_policy(x: dict, seed: int) -> dict:
    """Old log-probs ~0.3 nat from the policy's, so that ratios leave the clip range in both directions."""
    g = torch.Generator().manual_seed(seed)
    return {**x, "old": x["ref"] + 0.3 * torch.randn(x["ref"].shape, generator=g).to(DEVICE)}


def _ours(x, hidden, weight):
    if "old" not in x:
        return liger_peer.ours(x, hidden, weight)
    mask = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    return liger_peer.linear_policy_loss(hidden, weight, x["targets"], x["old"].to(torch.float32),
                                         x["adv"].repeat_interleave(x["t"]), mask, ref_logprobs=x["ref"],
                                         **liger_peer.OPTIONS)[0]


def _liger(module):
    def run(x, hidden, weight):
        if "old" not in x:
            return liger_peer.liger(module, x, hidden, weight)
        b, t = x["b"], x["t"]
        return module(hidden.view(b, t, -1), weight, x["targets"].view(b, t), torch.ones(b, t, device=hidden.device),
                      x["adv"], ref_per_token_logps=x["ref"].view(b, t), old_per_token_logps=x["old"].view(b, t))[0]
    return run


def _gold(x: dict):
    """The fp64 reference, old log-probs included when given."""
    h, w = (x[k].detach().double().requires_grad_() for k in ("hidden", "weight"))
    mask = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
    old = x["old"].double() if "old" in x else None
    loss = liger_peer.reference.linear_policy_loss(h, w, x["targets"], old, x["adv"].repeat_interleave(x["t"]).double(),
                                                   mask, ref_logprobs=x["ref"].double(), **liger_peer.OPTIONS)[0]
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("b,t,h,v", [(3, 37, 64, 1000), (2, 23, 48, 517)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("on_policy", [True, False])
def test_linear_policy_loss_against_liger(b, t, h, v, dtype, on_policy):
    x = liger_peer.inputs(b, t, h, v, DEVICE, dtype, seed=b * t + v)
    if not on_policy:
        x = _off_policy(x, seed=v)
    module = liger_peer.liger_loss(compiled=False)
    gold = _gold(x)
    ours = liger_peer.loss_and_grads(_ours, x)
    liger = liger_peer.loss_and_grads(_liger(module), x)
    what = f"B{b} T{t} H{h} V{v} {dtype} on_policy={on_policy}"
    for name, a, g, base in zip(("loss", "grad_hidden", "grad_weight"), ours, gold, liger, strict=True):
        assert_close(a, g, base, what=f"{name} {what}", dtype=dtype)
    # and Liger itself computes the same quantity (its error is bf16's or fp32's own, not a different loss)
    assert abs(liger[0].double().item() - gold[0].item()) <= 1e-3 * max(1.0, abs(gold[0].item()))
