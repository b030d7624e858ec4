import pytest
import torch
from kernel_checks import DEVICE, SLOW, assert_close, host_if_cuda, randint, randn
from rptfast.kernels import _utils as kernel_utils
from rptfast.kernels import linear_logprob, linear_policy_loss, policy_loss, reference
from rptfast.kernels import linear_loss as linear_loss_module
from rptfast.kernels import lm_head as lm_head_module
from torch.utils._python_dispatch import TorchDispatchMode

# (N, H, V): one token; V not a multiple of any block; V > 65536 with few rows; 423 rows (19 in the interpreter)
SHAPES = [(1, 16, 7), (37, 64, 1000), (5, 8, 70001), (423, 32, 517)]
if SLOW:  # the interpreter runs a program per row at a few ms per block: small shapes, one case for the large V
    SHAPES = [(1, 16, 7), (19, 32, 517), (3, 8, 70001)]
OPTIONS = {
    "on-policy": dict(on_policy=True),
    "clip+kl+dual": dict(dual_clip=3.0, kl_coef=0.05, ref=True, eps_high=0.28),
    "tis+seq-mean": dict(tis=True, aggregation="seq-mean-token-mean"),
}
DTYPES = [torch.float32, torch.bfloat16]
CASES = [(c, s, d) for c in OPTIONS for s in SHAPES for d in DTYPES]
if SLOW:  # the large vocabulary once: on-policy, fp32
    CASES = [(c, s, d) for c, s, d in CASES if s[2] < 65536 or (c == "on-policy" and d == torch.float32)]


def _data(n, h, v, dtype, seed, temperature=0.8):
    hidden = randn(n, h, seed=seed + 1, dtype=dtype)
    weight = randn(v, h, seed=seed + 2, scale=h**-0.5 * 3, dtype=dtype)
    targets = randint(v, n, seed=seed + 3)
    logp = reference.linear_logprob(hidden.double(), weight.double(), targets, temperature).float()
    old = logp + randn(n, seed=seed + 4, scale=0.3)  # ratios around 1: some clipped, some not
    adv = randn(n, seed=seed + 5)
    mask = randn(n, seed=seed + 6) > -1.0  # ~16% masked
    seq_ids = torch.sort(randint(max(1, n // 4), n, seed=seed + 7)).values
    return hidden, weight, targets, old, adv, mask, seq_ids


def _kwargs(opts, old, seq_ids, temperature=0.8):
    kw = dict(temperature=temperature, eps_high=opts.get("eps_high", 0.2), dual_clip=opts.get("dual_clip"))
    if opts.get("ref"):
        kw.update(ref_logprobs=old - 0.1, kl_coef=opts["kl_coef"])
    if opts.get("tis"):
        kw.update(rollout_logprobs=old + 0.2, tis_cap=1.5)
    if "aggregation" in opts:
        kw.update(aggregation=opts["aggregation"], seq_ids=seq_ids)
    return kw


def _cast(kw, dtype):
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kw.items()}


def _grads(fn, hidden, weight, *args, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    out = fn(h, w, *args, **kw)
    loss = out[0]
    loss.backward()
    return loss, h.grad, w.grad, out


def _two_step(h, w, targets, old, adv, mask, *, temperature, **kw):
    logp = linear_logprob(h, w, targets, temperature)
    return policy_loss(logp, logp.detach() if old is None else old, adv, mask, **kw)


@pytest.mark.parametrize("case,shape,dtype", CASES)
def test_matches_two_step_and_fp64(case, shape, dtype):
    opts, (n, h, v) = OPTIONS[case], shape
    hidden, weight, targets, old, adv, mask, seq_ids = _data(n, h, v, dtype, seed=n + v)
    old_arg = None if opts.get("on_policy") else old
    kw = _kwargs(opts, old, seq_ids)
    ours = _grads(linear_policy_loss, hidden, weight, targets, old_arg, adv, mask, **kw)
    two = _grads(_two_step, hidden, weight, targets, old_arg, adv, mask, **kw)
    gold_old = None if old_arg is None else old.double()
    gold = _grads(reference.linear_policy_loss, hidden.double(), weight.double(), targets, gold_old,
                  adv.double(), mask, **_cast(kw, torch.float64))  # fmt: skip
    assert ours[0].dtype == torch.float32 and ours[1].dtype == dtype and ours[2].dtype == dtype
    what = f"{case} n={n} h={h} v={v} {dtype}"
    for i, name in enumerate(("loss", "grad_hidden", "grad_weight")):
        assert_close(ours[i], gold[i], two[i], what=f"{name} {what}", dtype=dtype)
    # the detached logp and entropy agree with the two-step path's at scored rows and are 0 at masked ones (never
    # computed); the metrics agree
    logp, ent = linear_logprob(hidden, weight, targets, 0.8, return_entropy=True)
    for got, want in ((ours[3][2], logp), (ours[3][3], ent)):
        atol = 1e-5 * max(1.0, want.abs().max().item())
        torch.testing.assert_close(got[mask], want[mask], rtol=0, atol=atol)
        assert torch.equal(got[~mask], torch.zeros_like(got[~mask]))
    for k, val in two[3][1].items():
        assert ours[3][1][k].item() == pytest.approx(val.item(), abs=1e-5, rel=1e-4), k


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_row_tiles(monkeypatch, dtype):
    """Tiles of a few rows, so grad_weight accumulates (in fp32) over many of them."""
    monkeypatch.setattr(kernel_utils, "CPU_TILE_ELEMENTS", 3 * 300)
    monkeypatch.setattr(lm_head_module, "CPU_TILE_ELEMENTS", 3 * 300)
    monkeypatch.setattr(lm_head_module, "CUDA_TILE_BYTES", 3 * 300 * 4)
    hidden, weight, targets, old, adv, mask, seq_ids = _data(13 if SLOW else 61, 48, 300, dtype, seed=10)
    kw = _kwargs(OPTIONS["clip+kl+dual"], old, seq_ids, temperature=1.0)
    ours = _grads(linear_policy_loss, hidden, weight, targets, old, adv, mask, **kw)
    two = _grads(_two_step, hidden, weight, targets, old, adv, mask, **kw)
    gold = _grads(reference.linear_policy_loss, hidden.double(), weight.double(), targets, old.double(),
                  adv.double(), mask, **_cast(kw, torch.float64))  # fmt: skip
    for i, name in enumerate(("loss", "grad_hidden", "grad_weight")):
        assert_close(ours[i], gold[i], two[i], what=f"{name} many tiles {dtype}", dtype=dtype)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_micro_batches_sum_to_the_batch(aggregation):
    """With the global normalizer, micro-batch losses and gradients add up to the whole batch's."""
    n, h, v = (24, 16, 300) if SLOW else (90, 32, 1000)
    hidden, weight, targets, old, adv, mask, seq_ids = _data(n, h, v, torch.float32, seed=50)
    seq_ids = torch.arange(n, device=DEVICE) // 6  # sequences of 6 tokens, cut at multiples of 6 below
    normalizer = float(mask.sum()) if aggregation == "token-mean" else float(n // 6)
    kw = dict(aggregation=aggregation, normalizer=normalizer, kl_coef=0.05, ref_logprobs=old - 0.1)
    whole = _grads(linear_policy_loss, hidden, weight, targets, old, adv, mask, seq_ids=seq_ids, **kw)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    total = 0.0
    for part in (slice(0, 12), slice(12, n - 6), slice(n - 6, n)):
        ids = seq_ids[part] - seq_ids[part][0]
        kw_part = {**kw, "ref_logprobs": kw["ref_logprobs"][part]}
        data = (targets[part], old[part], adv[part], mask[part])
        loss = linear_policy_loss(h[part], w, *data, seq_ids=ids, **kw_part)[0]
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(whole[0].item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(h.grad, whole[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, whole[2], rtol=1e-5, atol=1e-6)


def test_grad_filter_error_is_bounded():
    """Peaked rows (a few large logits): filtering zeroes most blocks; what it drops is below eps per entry."""
    n, h, v = (64, 32, 4000) if SLOW else (200, 32, 4000)
    hidden, weight, targets, old, adv, mask, _ = _data(n, h, v, torch.float32, seed=60)
    weight = weight * 0.3
    hot = randint(v, 8, seed=61)
    weight[hot] *= 30  # 8 tokens take most of the probability mass in every row
    targets[: n // 2] = hot[randint(8, n // 2, seed=62)]
    exact = _grads(linear_policy_loss, hidden, weight, targets, old, adv, mask)
    filt = _grads(linear_policy_loss, hidden, weight, targets, old, adv, mask, grad_filter=True)
    frac = filt[3][1]["grad_filtered_frac"].item()
    assert 0.2 < frac < 1.0, f"filtered fraction {frac}"  # of the blocks of scored rows (0.26 at n=200)
    assert filt[0].item() == exact[0].item()  # the forward is untouched
    # each dropped entry of d loss / d logits is below eps * |dlogp| (T = 1), so grad_hidden moves by at most
    # eps * |dlogp_r| * sum_v |W[v, j]| at (r, j)
    logp = linear_logprob(hidden, weight, targets).detach().requires_grad_()
    (dlogp,) = torch.autograd.grad(policy_loss(logp, old, adv, mask)[0], logp)
    eps = linear_loss_module.filter_eps(torch.float32)
    bound = eps * dlogp.abs()[:, None] * weight.abs().sum(0)[None, :]  # [N, H]
    change = (filt[1] - exact[1]).abs()
    assert change.max() > 0 and (change <= bound * 1.01 + 1e-7).all(), (change - bound).max().item()
    gold = _grads(reference.linear_policy_loss, hidden.double(), weight.double(), targets, old.double(),
                  adv.double(), mask)  # fmt: skip
    rel = (filt[1].double() - gold[1]).abs().max().item() / gold[1].abs().max().item()
    assert rel < 2**-8, f"filtered grad_hidden is off by {rel:.3g} of its largest value (more than one bf16 ulp)"


def test_grad_filter_keeps_flat_rows():
    """Flat distributions have no block below eps: filtering changes nothing."""
    hidden, weight, targets, old, adv, mask, _ = _data(40, 16, 300, torch.float32, seed=70)
    exact = _grads(linear_policy_loss, hidden, weight * 0.01, targets, old, adv, mask)
    filt = _grads(linear_policy_loss, hidden, weight * 0.01, targets, old, adv, mask, grad_filter=True)
    assert filt[3][1]["grad_filtered_frac"].item() == 0.0
    assert torch.equal(filt[1], exact[1]) and torch.equal(filt[2], exact[2])


class CountMatmuls(TorchDispatchMode):
    """Counts the matmuls (mm and addmm, in place or into out=) that run inside the block."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__.rstrip("_") in ("mm", "addmm")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", DTYPES)
def test_frozen_weight_two_matmuls(monkeypatch, dtype):
    """A frozen lm_head (LoRA): no grad_weight, so matmul 3 (tile.T @ h) and its fp32 accumulator are skipped: two
    matmuls per tile of scored rows instead of three. The loss and grad_hidden are the same numbers as with the
    weight's gradient made (bitwise), and held to fp64 as the other cases are; clip, dual clip, KL and
    seq-mean aggregation on, several tiles (grad_hidden is scattered tile by tile)."""
    monkeypatch.setattr(kernel_utils, "CPU_TILE_ELEMENTS", 7 * 300)
    monkeypatch.setattr(lm_head_module, "CPU_TILE_ELEMENTS", 7 * 300)
    monkeypatch.setattr(lm_head_module, "CUDA_TILE_BYTES", 7 * 300 * 4)
    n, h, v = (19, 32, 300) if SLOW else (61, 48, 300)
    hidden, weight, targets, old, adv, mask, seq_ids = _data(n, h, v, dtype, seed=85)
    kw = _kwargs({**OPTIONS["clip+kl+dual"], "aggregation": "seq-mean-token-mean"}, old, seq_ids, temperature=0.9)
    scored = int(mask.sum())
    rows = lm_head_module.tile_rows(scored, v, hidden.element_size(), DEVICE, linear_loss_module.CUDA_TILE_SCALE)
    tiles = -(-scored // rows)
    assert tiles >= 2

    def run(weight_grad: bool):
        hd = hidden.detach().clone().requires_grad_()
        w = weight.detach().clone().requires_grad_(weight_grad)
        with CountMatmuls() as counter:
            loss = linear_policy_loss(hd, w, targets, old, adv, mask, **kw)[0]
            loss.backward()
        return loss, hd.grad, w.grad, counter.count

    frozen, trained = run(False), run(True)
    assert frozen[2] is None and trained[2] is not None
    assert (frozen[3], trained[3]) == (2 * tiles, 3 * tiles)
    assert torch.equal(frozen[0], trained[0]) and torch.equal(frozen[1], trained[1])
    gold_h = hidden.double().requires_grad_()
    gold = reference.linear_policy_loss(gold_h, weight.double(), targets, old.double(), adv.double(), mask,
                                        **_cast(kw, torch.float64))[0]
    gold.backward()
    hd = hidden.detach().clone().requires_grad_()
    two = _two_step(hd, weight, targets, old, adv, mask, **kw)[0]
    two.backward()
    assert_close(frozen[0], gold, two, what=f"loss, frozen weight {dtype}", dtype=dtype)
    assert_close(frozen[1], gold_h.grad, hd.grad, what=f"grad_hidden, frozen weight {dtype}", dtype=dtype)


def test_only_weight_needs_grad():
    hidden, weight, targets, old, adv, mask, _ = _data(9, 16, 50, torch.float32, seed=80)
    w = weight.clone().requires_grad_()
    linear_policy_loss(hidden, w, targets, None, adv, mask)[0].backward()
    gold_w = weight.double().requires_grad_()
    reference.linear_policy_loss(hidden.double(), gold_w, targets, None, adv.double(), mask)[0].backward()
    torch.testing.assert_close(w.grad.double(), gold_w.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(adv=lambda a: a[:-1]), r"advantages must be a flat tensor of shape \(5,\)"),
        (dict(old=lambda o: o[:-1]), "old_logprobs has shape"),
        (dict(w=lambda w: w.t()), "not transposed"),
        (dict(t=lambda t: t + 40, host=True), r"outside \[0, 40\)"),
        (dict(kw=dict(kl_coef=0.1)), "kl_coef > 0 needs ref_logprobs"),
        (dict(kw=dict(temperature=0.0)), "temperature"),
    ],
)
def test_bad_inputs_raise(change, match):
    h, w, t = randn(5, 8, seed=90), randn(40, 8, seed=91), randint(40, 5, seed=92)
    old, adv, mask = randn(5, seed=93), randn(5, seed=94), randn(5, seed=95) > 0
    if change.get("host"):
        h, w, t, old, adv, mask = host_if_cuda(h, w, t, old, adv, mask)
    f = lambda key, x: change[key](x) if key in change else x  # noqa: E731
    with pytest.raises(ValueError, match=match):
        linear_policy_loss(f("h", h), f("w", w), f("t", t), f("old", old), f("adv", adv), mask, **change.get("kw", {}))


def test_fp16_small_token_weights_do_not_underflow():
    """fp16 with token-mean over 2^21 tokens (the normalizer counts every micro-batch and rank: w = 2^-21) and a
    GradScaler-like loss scale of 2^16: no gradient row is zero where the fp64 one is not, and the error is within
    twice the two-step path's (whose loss scale reaches the tile before it rounds). Before the fix, w * dlogp * p
    (~2^-21 * p) went into the fp16 tile and the gradients were rounded to fp16 in the forward (fp16's smallest
    normal is 2^-14): at a loss scale of 2^15, 931 of 1000 grad_weight rows and 1 of 25 grad_hidden rows came out
    zero; at 2^16 (GradScaler's initial scale) the backward cast the scale itself to fp16, where it is inf."""
    n, h, v = (19, 32, 517) if SLOW else (37, 64, 1000)
    hidden, weight, targets, old, adv, mask, _ = _data(n, h, v, torch.float16, seed=90)
    kw = dict(temperature=0.8, normalizer=float(2**21))
    loss_scale = 2.0**16

    def run(fn, hidden, weight, old, adv):
        hd, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        loss = fn(hd, w, targets, old, adv, mask, **kw)[0]
        (loss * loss_scale).backward()
        return loss.detach(), hd.grad, w.grad

    ours = run(linear_policy_loss, hidden, weight, old, adv)
    two = run(_two_step, hidden, weight, old, adv)
    gold = run(reference.linear_policy_loss, hidden.double(), weight.double(), old.double(), adv.double())
    assert ours[1].dtype == ours[2].dtype == torch.float16
    for i, name in enumerate(("loss", "grad_hidden", "grad_weight")):
        assert_close(ours[i], gold[i], two[i], what=f"{name} fp16 w=2^-21", dtype=torch.float16)
    for name, g, want in (("grad_hidden", ours[1], gold[1]), ("grad_weight", ours[2], gold[2])):
        lost = (want.abs().amax(1) > 0) & (g.abs().amax(1) == 0)
        assert not lost.any(), f"{name}: {int(lost.sum())} rows underflowed to zero where fp64 is nonzero"


def test_deterministic_mode(monkeypatch):
    """Under torch.use_deterministic_algorithms(True) two runs give bit-identical gradients, equal to the default
    mode's within fp32 rounding of the target-term sums. On CUDA this is what the mode changes: index_add_'s
    atomics become torch's sorted index_put_ (module docstring), so the targets here repeat a lot (5 ids). On the
    CPU both modes add in row order; there the mode's NaN-filled torch.empty still checks that no uninitialized
    buffer is read."""
    if DEVICE.type == "cuda":
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # torch refuses deterministic cuBLAS without it
    n, h, v = (19, 32, 517) if SLOW else (300, 64, 1000)
    hidden, weight, targets, old, adv, mask, seq_ids = _data(n, h, v, torch.float32, seed=95)
    targets = randint(5, n, seed=96) * 97  # 5 ids, each the target of ~n/5 rows
    kw = _kwargs(OPTIONS["clip+kl+dual"], old, seq_ids)
    default = _grads(linear_policy_loss, hidden, weight, targets, old, adv, mask, **kw)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = (_grads(linear_policy_loss, hidden, weight, targets, old, adv, mask, **kw) for _ in range(2))
    finally:
        torch.use_deterministic_algorithms(was)
    for i, name in enumerate(("loss", "grad_hidden", "grad_weight")):
        assert torch.equal(first[i], second[i]), f"{name} differs between two deterministic runs"
        scale = default[i].abs().max().item()
        torch.testing.assert_close(first[i], default[i], rtol=0, atol=1e-6 * scale, msg=name)
