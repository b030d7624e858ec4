"""-inf logits, non-finite masked rows, the in-place backward and padded row strides, on every path.

Real models produce -inf logits (masked vocabularies, top-k/top-p processed logits): they are exact zeros
of the distribution. The gold replaces them by -1e4 in fp64, where exp(-1e4 / T - lse) underflows to
exactly 0, so p, p log p and every gradient term there are exactly 0, as the -inf semantics say, and
the reference needs no special case. Masked rows may hold anything (NaN, inf): their gradient must be
exactly 0 and the other rows must not change by a single bit.
"""

import pytest
import torch
from kernel_checks import DEVICE, SLOW, assert_close, gen, randint, randn
from rptfast.kernels import (
    fused_policy_loss_from_logits,
    linear_logprob,
    linear_policy_loss,
    policy_loss,
    reference,
    selective_logprob,
    topk_entropy,
)
from rptfast.kernels import linear_loss as linear_loss_module

NEG = float("-inf")


def masked_vocab(n: int, v: int, seed: int, dtype) -> torch.Tensor:
    """Logits whose first vocabulary block (8192 ids, MAX_BLOCK_V) and last 1000 ids are -inf."""
    x = randn(n, v, seed=seed, scale=3.0, dtype=dtype)
    x[:, :8192] = NEG
    x[:, -1000:] = NEG
    return x


def top_k_processed(n: int, v: int, k: int, seed: int, dtype) -> torch.Tensor:
    """Logits where all but k random ids per row are -inf (what top-k sampling leaves)."""
    x = randn(n, v, seed=seed, scale=3.0, dtype=dtype)
    keep = torch.rand(n, v, generator=gen(seed + 1)).argsort(dim=1)[:, :k].to(DEVICE)  # [N, k]
    return torch.full_like(x, NEG).scatter_(1, keep, x.gather(1, keep))


def finite_targets(x: torch.Tensor, seed: int) -> torch.Tensor:
    """One random id per row among the row's finite logits."""
    score = torch.rand(x.shape, generator=gen(seed)).to(DEVICE).masked_fill(~torch.isfinite(x), -1.0)
    return score.argmax(dim=1)


def gold_logits(x: torch.Tensor, dtype) -> torch.Tensor:
    return x.to(dtype).masked_fill(torch.isneginf(x), -1e4)


def _selective(fn, logits, targets, temperature, g_logp, g_ent, **kwargs):
    x = logits.detach().clone().requires_grad_()
    y = x * 1  # a non-leaf, so that an in-place backward writes into y, not into a leaf's storage
    logp, ent = fn(y, targets, temperature, return_entropy=True, **kwargs)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    return logp, ent, x.grad


CASES = [("masked vocab", 5, 20000), ("top-k processed", 6, 9000)] + ([] if SLOW else [("masked vocab", 2, 262144)])


@pytest.mark.parametrize("case,n,v", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_logprob_with_inf_logits(case, n, v, dtype):
    logits = masked_vocab(n, v, 1, dtype) if case == "masked vocab" else top_k_processed(n, v, 20, 1, dtype)
    targets = finite_targets(logits, 2)
    g_logp, g_ent = randn(n, seed=3), randn(n, seed=4)
    ours = _selective(selective_logprob, logits, targets, 0.8, g_logp, g_ent)
    gold = _selective(
        reference.selective_logprob, gold_logits(logits, torch.float64), targets, 0.8, g_logp.double(), g_ent.double()
    )
    base = _selective(
        reference.selective_logprob, gold_logits(logits, dtype), targets, 0.8, g_logp.to(dtype), g_ent.to(dtype)
    )
    for name, a, g, b in zip(("logprob", "entropy", "grad"), ours, gold, base, strict=True):
        assert_close(a, g, b, what=f"{name} {case} n={n} v={v} {dtype}")
    assert (ours[2][torch.isneginf(logits)] == 0).all(), "an -inf logit must get an exactly zero gradient"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_with_inf_logits(dtype):
    n, v = 7, 20000
    logits = masked_vocab(n, v, 5, dtype)
    logits[::2] = top_k_processed(n, v, 30, 6, dtype)[::2]
    targets = finite_targets(logits, 7)
    old, adv, mask = randn(n, seed=8) - 9.0, randn(n, seed=9), randn(n, seed=10) > -0.8
    options = dict(temperature=0.9, kl_coef=0.05, ref_logprobs=old + 0.1)

    def run(fn, x, dt):
        x = x.detach().clone().requires_grad_()
        cast = lambda t: t.to(dt) if t.is_floating_point() else t
        loss, _ = fn(x, targets, cast(old), cast(adv), mask, **dict(options, ref_logprobs=cast(old + 0.1)))
        loss.backward()
        return loss.detach(), x.grad

    buf = logits.clone()
    loss, _ = fused_policy_loss_from_logits(buf, targets, old, adv, mask, **options)
    gold = run(reference.policy_loss_from_logits, gold_logits(logits, torch.float64), torch.float64)
    base = run(reference.policy_loss_from_logits, gold_logits(logits, dtype), dtype)
    assert_close(loss, gold[0], base[0], what=f"loss {dtype}", dtype=torch.float32)
    assert_close(buf, gold[1], base[1], what=f"grad {dtype}")
    assert (buf[torch.isneginf(logits)] == 0).all()


def test_topk_entropy_with_fewer_than_k_finite_logits():
    """k=16 over rows with 5 finite logits (top-k processed with a smaller k), and over a masked vocabulary."""
    for x in (top_k_processed(9, 3000, 5, 11, torch.float32), masked_vocab(3, 12000, 12, torch.float32)):
        ours = topk_entropy(x, 16)
        gold = reference.topk_entropy(gold_logits(x, torch.float64), 16)
        base = reference.topk_entropy(gold_logits(x, torch.float32), 16)
        assert_close(ours, gold, base, what="topk entropy with -inf", dtype=torch.float32)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")  # the junk rows' forward
def test_masked_rows_with_nan_and_inf_get_zero_gradient():
    """Masked rows holding NaN, +inf or only -inf: zero gradient rows, and every other row bit-identical to
    a run where those rows hold ordinary values, for selective_logprob + policy_loss and the fused loss."""
    n, v = 9, 3001
    clean = randn(n, v, seed=20, scale=2.0)
    targets = randint(v, n, seed=21)
    old, adv = randn(n, seed=22) - 8.0, randn(n, seed=23)
    mask = torch.ones(n, dtype=torch.bool, device=DEVICE)
    mask[[1, 4, 6]] = False
    dirty = clean.clone()
    dirty[1] = float("nan")
    dirty[4, ::7] = float("inf")
    dirty[6] = NEG

    def composed(x):
        x = x.clone().requires_grad_()
        loss, _ = policy_loss(selective_logprob(x, targets, 1.2), old, adv, mask)
        loss.backward()
        return loss.detach(), x.grad

    def fused(x):
        buf = x.clone()
        return fused_policy_loss_from_logits(buf, targets, old, adv, mask, temperature=1.2)[0], buf

    for fn in (composed, fused):
        loss_clean, grad_clean = fn(clean)
        loss_dirty, grad_dirty = fn(dirty)
        assert torch.isfinite(loss_dirty) and torch.equal(loss_dirty, loss_clean), fn.__name__
        assert (grad_dirty[~mask] == 0).all() and torch.isfinite(grad_dirty).all(), fn.__name__
        assert torch.equal(grad_dirty[mask], grad_clean[mask]), fn.__name__


# (N, H, V) for the linear paths: 423 rows over several CPU tiles at V = 517, V > 65536 with a few rows
LINEAR_SHAPES = [(37, 64, 1000), (5, 8, 70001)] + ([(45, 32, 517)] if SLOW else [(423, 32, 517)])


def _poisoned_hidden(n: int, h: int, dtype, seed: int):
    """(hidden with NaN, +inf and -inf in the masked rows, the mask): about a third of the rows masked, the
    first masked and the last scored, so every shape has both kinds."""
    hidden = randn(n, h, seed=seed, dtype=dtype)
    mask = randn(n, seed=seed + 1) > -0.4
    mask[0], mask[-1] = False, True
    masked = (~mask).nonzero().squeeze(1)
    hidden[masked[0::3]] = float("nan")
    hidden[masked[1::3], 0] = float("inf")  # logits of either sign's infinity, NaN where weights are 0
    hidden[masked[2::3], -1] = float("-inf")
    return hidden, mask


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy in the interpreter
@pytest.mark.parametrize("n,h,v", LINEAR_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("on_policy", [True, False])
def test_linear_policy_loss_skips_masked_rows(monkeypatch, n, h, v, dtype, on_policy):
    """NaN and inf in masked rows' hidden states: both gradients finite, grad_hidden exactly 0 there, and
    everything equal to the fp64 reference computed without those rows; the row pass never sees them."""
    hidden, mask = _poisoned_hidden(n, h, dtype, seed=100 + n)
    weight = randn(v, h, seed=102, scale=h**-0.5 * 3, dtype=dtype)
    targets = randint(v, n, seed=103)
    old, adv = randn(n, seed=104) - 5.0, randn(n, seed=105)
    seq_ids = torch.sort(randint(max(1, n // 4), n, seed=106)).values
    n_seqs = float(seq_ids.max() + 1)
    options = dict(temperature=0.8, kl_coef=0.05, aggregation="seq-mean-token-mean", normalizer=n_seqs)
    seen = []
    row_pass = linear_loss_module._row_pass
    monkeypatch.setattr(
        linear_loss_module, "_row_pass", lambda tile, *a: seen.append(tile.shape[0]) or row_pass(tile, *a)
    )

    def run(fn, hidden, weight, keep, dt):
        hd, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        cast = lambda t: t[keep].to(dt)  # noqa: E731
        loss = fn(hd, w, targets[keep], None if on_policy else cast(old), cast(adv), mask[keep],
                  ref_logprobs=cast(old - 0.1), seq_ids=seq_ids[keep], **options)[0]  # fmt: skip
        loss.backward()
        return loss.detach(), hd.grad, w.grad

    every = torch.ones(n, dtype=torch.bool, device=DEVICE)
    ours = run(linear_policy_loss, hidden, weight, every, torch.float32)
    assert sum(seen) == int(mask.sum()), "the row pass must see the scored rows only"
    gold = run(reference.linear_policy_loss, hidden[mask].double(), weight.double(), mask, torch.float64)
    base = run(reference.linear_policy_loss, hidden[mask], weight, mask, dtype)
    assert (ours[1][~mask] == 0).all(), "masked rows must get an exactly zero grad_hidden"
    what = f"n={n} h={h} v={v} {dtype} on_policy={on_policy}"
    assert_close(ours[0], gold[0], base[0], what=f"loss {what}", dtype=dtype)
    assert_close(ours[1][mask], gold[1], base[1], what=f"grad_hidden {what}")
    assert_close(ours[2], gold[2], base[2], what=f"grad_weight {what}")


def test_linear_policy_loss_with_every_row_masked(monkeypatch):
    """A micro-batch with nothing to score (a rank's padding): loss 0, zero gradients, no tile at all."""
    n, h, v = 6, 16, 300
    hidden = torch.full((n, h), float("nan"), device=DEVICE).requires_grad_()
    weight = randn(v, h, seed=110).requires_grad_()
    monkeypatch.setattr(linear_loss_module, "_row_pass", None)  # calling it would raise
    none = torch.zeros(n, dtype=torch.bool, device=DEVICE)
    loss, metrics, logp, ent = linear_policy_loss(
        hidden, weight, randint(v, n, seed=111), None, randn(n, seed=112), none
    )
    loss.backward()
    assert loss.item() == 0.0 and metrics["ratio_mean"].item() == 0.0
    for t in (hidden.grad, weight.grad, logp, ent):
        assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy in the interpreter, on
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")  # the NaN rows' forward
@pytest.mark.parametrize("n,h,v", LINEAR_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_logprob_backward_skips_rows_without_gradient(n, h, v, dtype):
    """linear_logprob's backward with zero upstream gradients at rows whose hidden states hold NaN or inf:
    grad_weight stays finite (it would be NaN through 0 x NaN in d logits.T @ hidden), grad_hidden is 0
    there, and both equal the fp64 reference computed without those rows."""
    hidden, mask = _poisoned_hidden(n, h, dtype, seed=120 + n)
    weight = randn(v, h, seed=122, scale=h**-0.5 * 3, dtype=dtype)
    targets = randint(v, n, seed=123)
    g_logp, g_ent = randn(n, seed=124) * mask, randn(n, seed=125) * mask  # [N], 0 at masked rows

    def run(fn, hidden, weight, keep, dt):
        hd, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        logp, ent = fn(hd, w, targets[keep], 0.8, return_entropy=True)
        torch.autograd.backward((logp, ent), (g_logp[keep].to(logp.dtype), g_ent[keep].to(ent.dtype)))
        return hd.grad, w.grad

    every = torch.ones(n, dtype=torch.bool, device=DEVICE)
    ours = run(linear_logprob, hidden, weight, every, dtype)
    gold = run(reference.linear_logprob, hidden[mask].double(), weight.double(), mask, torch.float64)
    base = run(reference.linear_logprob, hidden[mask], weight, mask, dtype)
    assert (ours[0][~mask] == 0).all(), "rows without an upstream gradient must get an exactly zero grad_hidden"
    what = f"n={n} h={h} v={v} {dtype}"
    assert_close(ours[0][mask], gold[0], base[0], what=f"grad_hidden {what}")
    assert_close(ours[1], gold[1], base[1], what=f"grad_weight {what}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward(dtype):
    """Same gradient as the default backward, bit for bit, written into the logits' own storage."""
    n, v, h = 13, 4099, 16
    hidden = randn(n, h, seed=30, dtype=dtype)
    weight = randn(v, h, seed=31, scale=0.5, dtype=dtype)
    targets = randint(v, n, seed=32)
    g_logp, g_ent = randn(n, seed=33), randn(n, seed=34)
    g_logp[[2, 7]] = 0.0  # masked rows: zeros, nothing read
    g_ent[[2, 7]] = 0.0
    results = []
    for inplace in (False, True):
        hd = hidden.clone().requires_grad_()
        logits = hd @ weight.t()  # [N, V]
        seen = []
        logits.register_hook(lambda g, seen=seen: seen.append((g.data_ptr(), g.clone())))
        logp, ent = selective_logprob(logits, targets, 0.9, return_entropy=True, inplace_backward=inplace)
        ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
        assert (seen[0][0] == logits.data_ptr()) == inplace, "the in-place gradient must live in the logits' storage"
        results.append((seen[0][1], hd.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert (results[1][0][[2, 7]] == 0).all()


def test_inplace_backward_refuses_logits_that_another_node_saved():
    """A second consumer that saved the logits would read a gradient: autograd raises instead."""
    x = randn(4, 300, seed=40).requires_grad_()
    logits = x * 1
    targets = randint(300, 4, seed=41)
    squares = logits.pow(2).sum()  # pow saves logits; made first, so its backward runs after selective_logprob's
    loss = selective_logprob(logits, targets, inplace_backward=True).sum() + squares
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_padded_row_stride_with_odd_vocab():
    """V % 16 != 0 (50257) inside a row stride of 50272, as a padded lm_head leaves it: the same results
    as contiguous rows, bit for bit (the full-block loads are unmasked, the tail masked)."""
    n, v, stride = 3, 50257, 50272
    wide = randn(n, stride, seed=50, scale=3.0)
    targets = randint(v, n, seed=51)
    dense = wide[:, :v].contiguous()
    for x in (wide[:, :v], dense):
        assert x.stride(0) == (stride if x is not dense else v)
    a = _selective(selective_logprob, wide[:, :v], targets, 1.0, randn(n, seed=52), randn(n, seed=53))
    b = _selective(selective_logprob, dense, targets, 1.0, randn(n, seed=52), randn(n, seed=53))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    old, adv, mask = randn(n, seed=54) - 10.0, randn(n, seed=55), randn(n, seed=56) > -1
    buf = wide.clone()
    loss_a, _ = fused_policy_loss_from_logits(buf[:, :v], targets, old, adv, mask)
    loss_b, _ = fused_policy_loss_from_logits(dense, targets, old, adv, mask)
    assert torch.equal(loss_a, loss_b) and torch.equal(buf[:, :v], dense) and torch.equal(buf[:, v:], wide[:, v:])


def test_sparse_unsorted_sequence_ids():
    """seq_ids out of order and with ids that own no token (empty sequences count): the sync-free
    per-sequence token counts match the reference's loop over sequences."""
    n = 40
    seq_ids = torch.tensor([7, 2, 2, 9, 0, 7] * 6 + [2, 9, 9, 0], device=DEVICE)
    logp = randn(n, seed=60) - 3.0
    old, adv, mask = logp + randn(n, seed=61, scale=0.5), randn(n, seed=62), randn(n, seed=63) > -0.5
    for aggregation in ("seq-mean-token-mean", "seq-mean-token-sum-norm"):
        options = dict(aggregation=aggregation, seq_ids=seq_ids, max_len=11)
        x, gx = logp.clone().requires_grad_(), logp.double().requires_grad_()
        loss, _ = policy_loss(x, old, adv, mask, **options)
        gold, _ = reference.policy_loss(gx, old.double(), adv.double(), mask, **options)
        loss.backward()
        gold.backward()
        torch.testing.assert_close(loss.double(), gold, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(x.grad.double(), gx.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="host syncs exist only on CUDA (on the CPU nothing waits)")
def test_no_host_sync_in_the_loss_path():
    """selective_logprob forward + backward, policy_loss with seq_ids and the fused loss never read a
    device value back to the host (CUDA-graph capturable; the stream never stalls)."""
    n, v = 64, 4099
    logits = randn(n, v, seed=70, dtype=torch.bfloat16).requires_grad_()
    targets = randint(v, n, seed=71)
    seq_ids = torch.arange(n, device=DEVICE) // 8
    old, adv, mask = randn(n, seed=72) - 8.0, randn(n, seed=73), randn(n, seed=74) > 0

    def step():
        logp = selective_logprob(logits, targets, 0.9)
        loss, _ = policy_loss(logp, old, adv, mask, aggregation="seq-mean-token-mean", seq_ids=seq_ids)
        loss.backward()
        fused_policy_loss_from_logits(
            logits.detach().clone(), targets, old, adv, mask, aggregation="seq-mean-token-mean", seq_ids=seq_ids
        )

    step()  # compiles the kernels first: only the steady state is checked
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _edge_losses(dtype, logp_or_data, old, adv, mask, scale, **options):
    """(loss, gradient) of each loss entry point on the same tokens: policy_loss on log-probs, the fused loss
    on logits, the linear loss on hidden states (off-policy: old given), each backpropagated with a loss scale."""
    n, v, h = mask.shape[0], 300, 16
    logp = logp_or_data.to(dtype).requires_grad_()
    loss, _ = policy_loss(logp, old, adv, mask, **options)
    (loss * scale).backward()
    out = {"policy_loss": (loss, logp.grad)}
    logits = randn(n, v, seed=80, scale=2.0, dtype=dtype)
    targets = randint(v, n, seed=81)
    loss, _ = fused_policy_loss_from_logits(logits, targets, old, adv, mask, **options)
    out["fused_policy_loss_from_logits"] = (loss, logits)  # the buffer holds d loss / d logits
    hidden = randn(n, h, seed=82, dtype=dtype).requires_grad_()
    weight = randn(v, h, seed=83, scale=h**-0.5, dtype=dtype).requires_grad_()
    loss = linear_policy_loss(hidden, weight, targets, old, adv, mask, **options)[0]
    (loss * scale).backward()
    out["linear_policy_loss"] = (loss, torch.cat([hidden.grad.flatten(), weight.grad.flatten()]))
    return out


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy in the interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_token_loss_edge_cases_have_one_behaviour(dtype):
    """The per-token loss (loss.py's _token_loss and its torch twin) behaves the same on every path: this file
    runs through the torch path and, under TRITON_INTERPRET=1, through the Triton code, whose min, max and where
    the interpreter evaluates as the GPU does (tl.maximum's default drops a NaN operand, like PTX max.f32).

    - every row masked, NaN and inf in them, fp16/bf16 inputs and a loss scale of 2^16 (GradScaler's first):
      the loss and every gradient exactly 0;
    - A = 0 where the ratio overflows (old = -inf: -0 * inf is NaN in IEEE arithmetic): that token adds exactly
      0, gradient included, and the loss equals the one with a finite old log-prob there (torch gave NaN here,
      the Triton code a finite value);
    - a NaN log-prob in a scored token with A != 0: the loss is NaN on every path (the Triton code hid it
      behind the clip bound), so the trainer's non-finite check sees it."""
    n, scale = 9, 2.0**16
    logp = randn(n, seed=84) - 3.0
    old, adv, ref = logp + randn(n, seed=85, scale=0.4), randn(n, seed=86), logp - 0.2
    options = dict(kl_coef=0.05, ref_logprobs=ref, dual_clip=3.0, eps_low=0.2, eps_high=0.28)

    none = torch.zeros(n, dtype=torch.bool, device=DEVICE)
    poison = torch.full((n,), float("nan"), device=DEVICE)
    for name, (loss, grad) in _edge_losses(dtype, poison, poison.clone().fill_(NEG), adv, none, scale,
                                           **options).items():
        assert loss.item() == 0.0 and not grad.abs().gt(0).any() and not grad.isnan().any(), name

    mask = randn(n, seed=87) > -0.8
    k = int(mask.nonzero()[0])  # a scored token with A = 0 and an infinite ratio
    adv0, old_inf, old_fin = adv.clone(), old.clone(), old.clone()
    adv0[k], old_inf[k] = 0.0, NEG
    count = float(mask.sum())  # the same normalizer for both: token k is scored, it adds 0
    ours = _edge_losses(dtype, logp, old_inf, adv0, mask, scale, normalizer=count, **options)
    want = _edge_losses(dtype, logp, old_fin, adv0, mask, scale, normalizer=count, **options)
    for name in ours:
        (loss, grad), (loss_w, grad_w) = ours[name], want[name]
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), name
        assert loss.item() == loss_w.item() and torch.equal(grad, grad_w), name

    nan_logp = logp.clone()
    nan_logp[k] = float("nan")
    adv[k] = -0.5
    # no KL term: it would carry the NaN on every path anyway; the clipped term alone must
    for extra in ({}, {"dual_clip": 3.0}, {"rollout_logprobs": old - 0.1, "tis_cap": 2.0}):
        loss, _ = policy_loss(nan_logp.to(dtype), old, adv, mask, **extra)
        assert loss.isnan(), f"a NaN log-prob of a scored token must reach the loss ({extra})"
