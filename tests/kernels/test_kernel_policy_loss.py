import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import DEVICE, SLOW, assert_close, gen, host_if_cuda, randn
from rptfast.kernels import policy_loss, reference

AGGREGATIONS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def make_batch(seed: int, n_seqs: int, max_len: int, dtype=torch.float32):
    """A packed batch: sequences of random length (1..max_len), ~30% masked tokens, one sequence fully
    masked; old log-probs spread so that ratios land on both sides of both clip bounds and past the
    dual clip (3)."""
    g = gen(seed)
    lengths = torch.randint(1, max_len + 1, (n_seqs,), generator=g)
    seq_ids = torch.repeat_interleave(torch.arange(n_seqs), lengths)
    n = int(lengths.sum())
    logp = -torch.rand(n, generator=g, dtype=torch.float64) * 4 - 0.05
    batch = dict(
        logprobs=logp,
        old_logprobs=logp + torch.randn(n, generator=g, dtype=torch.float64) * 0.7,
        advantages=torch.randn(n_seqs, generator=g, dtype=torch.float64)[seq_ids],
        mask=torch.rand(n, generator=g) > 0.3,
        ref_logprobs=logp + torch.randn(n, generator=g, dtype=torch.float64) * 0.2,
        rollout_logprobs=logp + torch.randn(n, generator=g, dtype=torch.float64) * 0.3,
    )
    batch["mask"][seq_ids == n_seqs // 2] = False
    out = {k: v.to(DEVICE, dtype if v.is_floating_point() else v.dtype) for k, v in batch.items()}
    return out, seq_ids.to(DEVICE), int(lengths.max())


def _loss_and_grad(fn, batch, **options):
    x = batch["logprobs"].detach().clone().requires_grad_()
    loss, metrics = fn(x, *(batch[k] for k in ("old_logprobs", "advantages", "mask")), **options)
    loss.backward()
    return loss, x.grad, metrics


def _options(batch, seq_ids, max_len, aggregation, dual_clip, kl, tis, eps_high):
    options = dict(eps_low=0.2, eps_high=eps_high, aggregation=aggregation, dual_clip=dual_clip)
    if kl:
        options.update(ref_logprobs=batch["ref_logprobs"], kl_coef=0.05)
    if tis:
        options.update(rollout_logprobs=batch["rollout_logprobs"], tis_cap=1.2)
    if aggregation != "token-mean":
        options["seq_ids"] = seq_ids
    if aggregation == "seq-mean-token-sum-norm":
        options["max_len"] = max_len + 3
    return options


def _as(options, dtype):
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in options.items()}


def _compare(batch, options, dtype):
    ours = _loss_and_grad(policy_loss, batch, **options)
    gold = _loss_and_grad(reference.policy_loss, _as(batch, torch.float64), **_as(options, torch.float64))
    base = _loss_and_grad(reference.policy_loss, batch, **options)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == dtype
    assert_close(ours[0], gold[0], base[0], what="loss", dtype=torch.float32)
    assert_close(ours[1], gold[1], base[1], what="grad")
    assert ours[2].keys() == gold[2].keys()
    for key, value in ours[2].items():
        assert value.dtype == torch.float32 and value.dim() == 0
        # fractions may differ by a token whose ratio sits within rounding of a clip bound
        expected = gold[2][key].item()
        tol = 1.5 / max(int(batch["mask"].sum()), 1) if "frac" in key else 1e-5 * max(1.0, abs(expected))
        assert abs(value.item() - expected) <= tol, (key, value.item(), expected)
    return ours[2]


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("features", ["plain", "dual_clip", "kl+tis", "all"])
def test_every_option_matches_fp64_reference(aggregation, features):
    """A fixed batch in which every branch is taken: both clip sides, the dual clip, capped weights."""
    batch, seq_ids, longest = make_batch(11, 9, 33)
    dual = 3.0 if features in ("dual_clip", "all") else None
    kl = tis = features in ("kl+tis", "all")
    options = _options(batch, seq_ids, longest, aggregation, dual, kl, tis, 0.28)
    metrics = _compare(batch, options, torch.float32)
    assert metrics["clip_frac_low"] > 0 and metrics["clip_frac_high"] > 0
    if dual:
        assert metrics["dual_clip_frac"] > 0
    if tis:
        assert metrics["tis_weight_mean"] < 1.2 and metrics["kl_mean"] > 0


@settings(max_examples=8 if SLOW else 30, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**16),
    n_seqs=st.integers(1, 9),
    max_len=st.sampled_from([1, 5, 33]),
    aggregation=st.sampled_from(AGGREGATIONS),
    dual_clip=st.sampled_from([None, 3.0]),
    kl=st.booleans(),
    tis=st.booleans(),
    eps_high=st.sampled_from([0.2, 0.28]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_matches_fp64_reference(seed, n_seqs, max_len, aggregation, dual_clip, kl, tis, eps_high, dtype):
    batch, seq_ids, longest = make_batch(seed, n_seqs, max_len, dtype)
    _compare(batch, _options(batch, seq_ids, longest, aggregation, dual_clip, kl, tis, eps_high), dtype)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_two_dimensional_layout_matches_flat(aggregation):
    """[B, L] rows are sequences: same loss and gradient as the flat layout with seq_ids = row."""
    b, l = 6, 13
    batch = {
        k: randn(b, l, seed=i, scale=0.3) - (1.0 if k != "advantages" else 0.0)
        for i, k in enumerate(("logprobs", "old_logprobs", "advantages"))
    }
    batch["mask"] = randn(b, l, seed=9) > -0.5
    batch["mask"][2] = False  # an all-masked sequence
    options = dict(aggregation=aggregation, max_len=l if aggregation == "seq-mean-token-sum-norm" else None)
    loss_2d, grad_2d, _ = _loss_and_grad(policy_loss, batch, **options)
    flat = {k: v.reshape(-1) for k, v in batch.items()}
    if aggregation != "token-mean":
        options["seq_ids"] = torch.arange(b, device=DEVICE).repeat_interleave(l)
    loss_flat, grad_flat, _ = _loss_and_grad(policy_loss, flat, **options)
    torch.testing.assert_close(loss_2d, loss_flat)
    torch.testing.assert_close(grad_2d.reshape(-1), grad_flat)
    gold = _loss_and_grad(
        reference.policy_loss, _as(batch, torch.float64), **_as(options | {"seq_ids": None}, torch.float64)
    )
    torch.testing.assert_close(loss_2d.double(), gold[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_micro_batches_sum_to_the_whole_batch(aggregation):
    """Split the batch by sequences (and, for token-mean, mid-sequence); with the global normalizer the
    micro-batch losses and gradients add up to the whole batch's."""
    batch, seq_ids, longest = make_batch(123, 8, 17)
    options = _options(batch, seq_ids, longest, aggregation, 3.0, True, True, 0.28)
    whole_loss, whole_grad, _ = _loss_and_grad(policy_loss, batch, **options)
    n = batch["mask"].shape[0]
    if aggregation == "token-mean":
        cuts = [0, n // 3, n // 3 + 1, n]  # one micro-batch of a single token
        normalizer = int(batch["mask"].sum())
    else:
        starts = [int((seq_ids == s).nonzero()[0]) for s in (0, 3, 4)] + [n]
        cuts = starts
        normalizer = int(seq_ids.max()) + 1
    total, grads = 0.0, []
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        part = {k: v[lo:hi] for k, v in batch.items()}
        part_options = {k: v[lo:hi] if isinstance(v, torch.Tensor) else v for k, v in options.items()}
        if "seq_ids" in part_options:
            part_options["seq_ids"] = part_options["seq_ids"] - part_options["seq_ids"].min()
        loss, grad, _ = _loss_and_grad(policy_loss, part, **part_options, normalizer=normalizer)
        total = total + loss
        grads.append(grad)
    torch.testing.assert_close(total, whole_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.cat(grads), whole_grad, rtol=1e-6, atol=1e-9)
    tensor_norm = torch.tensor(float(normalizer), device=DEVICE)
    loss_t, grad_t, _ = _loss_and_grad(policy_loss, batch, **options, normalizer=tensor_norm)
    torch.testing.assert_close(loss_t, whole_loss)
    torch.testing.assert_close(grad_t, whole_grad)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
def test_masked_tokens_never_leak():
    """Masked positions may hold inf/NaN (padding): the loss, gradient and metrics stay finite, the
    gradient there is exactly 0, and an all-masked batch gives loss 0."""
    batch, seq_ids, longest = make_batch(7, 5, 9)
    mask = batch["mask"]
    for key, junk in (
        ("logprobs", float("nan")),
        ("old_logprobs", float("-inf")),
        ("advantages", float("inf")),
    ):
        batch[key] = batch[key].masked_fill(~mask, junk)
    for aggregation in AGGREGATIONS:
        options = _options(batch, seq_ids, longest, aggregation, 3.0, True, False, 0.2)
        loss, grad, metrics = _loss_and_grad(policy_loss, batch, **options)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert (grad[~mask] == 0).all() and (grad[mask] != 0).any()
        assert all(torch.isfinite(v) for v in metrics.values())
    none = dict(batch, mask=torch.zeros_like(mask))
    loss, grad, metrics = _loss_and_grad(policy_loss, none, aggregation="seq-mean-token-mean", seq_ids=seq_ids)
    assert loss.item() == 0 and (grad == 0).all() and metrics["ratio_mean"].item() == 0


def test_float_mask_and_empty_batch():
    batch, _, _ = make_batch(3, 4, 6)
    as_float = dict(batch, mask=batch["mask"].float())
    torch.testing.assert_close(_loss_and_grad(policy_loss, as_float)[:2], _loss_and_grad(policy_loss, batch)[:2])
    empty = {k: v[:0] for k, v in batch.items()}
    loss, grad, _ = _loss_and_grad(policy_loss, empty)
    assert loss.item() == 0 and grad.shape == (0,)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(aggregation="seq-mean"), "aggregation='seq-mean' is unknown"),
        (dict(aggregation="seq-mean-token-mean"), "needs seq_ids"),
        (dict(aggregation="seq-mean-token-sum-norm", seq_ids="ids"), "needs max_len"),
        (dict(seq_ids="ids_int32", aggregation="seq-mean-token-mean"), "int64"),
        (dict(kl_coef=0.1), "needs ref_logprobs"),
        (dict(tis_cap=2.0), "both or neither"),
        (dict(rollout_logprobs="x"), "both or neither"),
        (dict(eps_low=1.0), "eps_low"),
        (dict(eps_high=-0.1), "eps_high"),
        (dict(dual_clip=1.0), "dual_clip"),
        (dict(normalizer=0), "normalizer"),
        (dict(ref_logprobs="short"), "ref_logprobs has shape"),
    ],
)
def test_bad_options_raise(options, match):
    batch, seq_ids, _ = make_batch(5, 3, 4)
    values = {
        "ids": seq_ids,
        "ids_int32": seq_ids.int(),
        "x": batch["logprobs"],
        "short": batch["logprobs"][:-1],
    }
    options = {k: values.get(v, v) if isinstance(v, str) and k != "aggregation" else v for k, v in options.items()}
    with pytest.raises(ValueError, match=match):
        policy_loss(batch["logprobs"], batch["old_logprobs"], batch["advantages"], batch["mask"], **options)


def test_bad_layouts_raise():
    x = randn(3, 4, seed=1)
    with pytest.raises(ValueError, match="advantages has shape"):
        policy_loss(x, x, x[0], x > 0)
    with pytest.raises(ValueError, match="only for flat"):
        policy_loss(x, x, x, x > 0, seq_ids=torch.zeros(12, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        policy_loss(x[None], x[None], x[None], x[None] > 0)
    row, seq_ids = host_if_cuda(x[0], torch.tensor([0, -1, 0, 0], device=DEVICE))
    with pytest.raises(ValueError, match="negative"):
        policy_loss(row, row, row, row > 0, aggregation="seq-mean-token-mean", seq_ids=seq_ids)
