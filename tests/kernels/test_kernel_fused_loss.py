import pytest
import torch
from kernel_checks import DEVICE, FLOOR, SLOW, assert_close, host_if_cuda, randint, randn
from rptfast.kernels import fused_policy_loss_from_logits, reference
from test_kernel_policy_loss import AGGREGATIONS, make_batch

# (N, V, H): the logits come from hidden [N, H] @ weight [V, H].T, so the test also checks the
# documented way to continue backprop: logits.backward(logits).
SHAPES = [(1, 1, 8), (37, 4099, 16), (4, 70001, 8)] + ([(60, 100, 8)] if SLOW else [(423, 1000, 16)])


def _model_grads(fn, hidden, weight, targets, batch, options, fused):
    """(loss, metrics, grad_hidden, grad_weight, d loss / d logits) for the fused kernel or the reference."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    logits = h @ w.t()  # [N, V]
    args = (logits, targets, batch["old_logprobs"], batch["advantages"], batch["mask"])
    if fused:
        loss, metrics = fn(*args, **options)
        dlogits = logits.detach().clone()
        logits.backward(logits)
    else:
        logits.retain_grad()
        loss, metrics = fn(*args, **options)
        loss.backward()
        dlogits = logits.grad
    return loss, metrics, h.grad, w.grad, dlogits


@pytest.mark.parametrize("n,v,h", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_matches_autograd_of_reference(n, v, h, dtype, aggregation):
    seq_ids = torch.arange(n, device=DEVICE) // 5  # sequences of 5 tokens, the last one shorter
    batch = {
        "old_logprobs": randn(n, seed=1, scale=0.5) - 0.5 - (v > 1) * float(torch.tensor(v).log()),
        "advantages": randn(n, seed=2),
        "mask": randn(n, seed=3) > -0.5,
    }
    hidden = randn(n, h, seed=4, dtype=dtype)
    weight = randn(v, h, seed=5, scale=h**-0.5 * 2, dtype=dtype)
    targets = randint(v, n, seed=6)
    options = dict(
        temperature=0.9,
        aggregation=aggregation,
        dual_clip=3.0,
        kl_coef=0.05,
        ref_logprobs=batch["old_logprobs"] + 0.1,
        rollout_logprobs=batch["old_logprobs"] - 0.1,
        tis_cap=1.05,
    )
    if aggregation != "token-mean":
        options["seq_ids"] = seq_ids
    if aggregation == "seq-mean-token-sum-norm":
        options["max_len"] = 6
    ours = _model_grads(fused_policy_loss_from_logits, hidden, weight, targets, batch, options, True)
    f64 = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    opt64 = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in options.items()}
    gold = _model_grads(reference.policy_loss_from_logits, hidden.double(), weight.double(), targets, f64, opt64, False)
    base = _model_grads(reference.policy_loss_from_logits, hidden, weight, targets, batch, options, False)
    assert not ours[0].requires_grad and ours[0].dtype == torch.float32
    assert_close(ours[0], gold[0], base[0], what="loss", dtype=torch.float32)
    for i, name in ((2, "grad_hidden"), (3, "grad_weight"), (4, "grad_logits")):
        assert ours[i].dtype == dtype
        assert_close(ours[i], gold[i], base[i], what=f"{name} n={n} v={v} {dtype} {aggregation}")
    assert (ours[4][~batch["mask"]] == 0).all(), "masked rows must be overwritten with zeros"
    for key, value in ours[1].items():
        # a fraction may differ by a token whose ratio sits within rounding of a bound
        expected = gold[1][key].item()
        err, base_err = abs(value.item() - expected), abs(base[1][key].item() - expected)
        floor = 1.5 / n if "frac" in key else FLOOR[torch.float32] * max(1.0, abs(expected))
        assert err <= 2 * base_err + floor, (key, err, base_err, expected)


def test_same_as_policy_loss_of_selective_logprob():
    """The fused pass equals the two public functions composed (same loss, metrics, logits gradient)."""
    from rptfast.kernels import policy_loss, selective_logprob

    batch, seq_ids, _ = make_batch(21, 6, 12)
    n, v = seq_ids.shape[0], 333
    logits = randn(n, v, seed=22, scale=2.0)
    targets = randint(v, n, seed=23)
    options = dict(aggregation="seq-mean-token-mean", seq_ids=seq_ids, dual_clip=2.5)
    x = logits.clone().requires_grad_()
    loss, metrics = policy_loss(
        selective_logprob(x, targets, 1.1),
        batch["old_logprobs"],
        batch["advantages"],
        batch["mask"],
        **options,
    )
    loss.backward()
    buf = logits.clone()
    fused_loss, fused_metrics = fused_policy_loss_from_logits(
        buf, targets, batch["old_logprobs"], batch["advantages"], batch["mask"], temperature=1.1, **options
    )
    torch.testing.assert_close(fused_loss, loss.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(buf, x.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(fused_metrics, metrics)


def test_row_strided_logits_are_written_in_place():
    wide = randn(9, 70, seed=30)
    view = wide[:, :50]
    before = wide[:, 50:].clone()
    targets = randint(50, 9, seed=31)
    args = (targets, randn(9, seed=32) - 4, randn(9, seed=33), randn(9, seed=34) > 0)
    fused_policy_loss_from_logits(view, *args)
    expected = wide[:, :50].contiguous()
    fresh = randn(9, 70, seed=30)[:, :50].contiguous()
    fused_policy_loss_from_logits(fresh, *args)
    torch.testing.assert_close(expected, fresh, rtol=0, atol=0)
    assert torch.equal(wide[:, 50:], before), "columns outside the view were touched"


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda x, t, o: (x.t(), t, o), "unit stride"),
        (lambda x, t, o: (x, t, o[:, None]), "flat tensor"),
        (lambda x, t, o: host_if_cuda(x, t + 100, o), r"outside \[0, 8\)"),
        (lambda x, t, o: (x.int(), t, o), "dtype"),
    ],
)
def test_bad_inputs_raise(make, match):
    x, t, o = randn(8, 8, seed=40), randint(8, 8, seed=41), randn(8, seed=42)
    logits, targets, old = make(x, t, o)
    adv = o.to(logits.device)
    with pytest.raises(ValueError, match=match):
        fused_policy_loss_from_logits(logits, targets, old, adv, adv > 0)
    with pytest.raises(ValueError, match="temperature"):
        fused_policy_loss_from_logits(x, t, o, o, o > 0, temperature=-1.0)
    with pytest.raises(ValueError, match="needs seq_ids"):
        fused_policy_loss_from_logits(x, t, o, o, o > 0, aggregation="seq-mean-token-mean")
