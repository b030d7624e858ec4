import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import DEVICE, SLOW, assert_close, gen
from rptfast.kernels import group_advantages, reference


def make_rewards(seed: int, n_groups: int, group_size: int, kind: str) -> torch.Tensor:
    """Binary (RPT's prefix match, parity's exact answer) or continuous rewards; every third group is
    made all-equal, the case dynamic sampling drops."""
    g = gen(seed)
    if kind == "binary":
        r = (torch.rand(n_groups, group_size, generator=g) > 0.5).double()
    else:
        r = torch.randn(n_groups, group_size, generator=g, dtype=torch.float64) * 3 + 1
    r[::3] = r[::3, :1]
    return r.reshape(-1).to(DEVICE)


@settings(max_examples=10 if SLOW else 40, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**16),
    n_groups=st.integers(1, 70),
    group_size=st.sampled_from([2, 3, 8, 16, 17, 64]),
    kind=st.sampled_from(["binary", "continuous"]),
    scale=st.sampled_from(["group", "none"]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
def test_matches_fp64_reference(seed, n_groups, group_size, kind, scale, dtype):
    rewards = make_rewards(seed, n_groups, group_size, kind).to(dtype)
    adv, all_equal = group_advantages(rewards, group_size, scale)
    gold, gold_equal = reference.group_advantages(rewards.double(), group_size, scale)
    base, _ = reference.group_advantages(rewards.float(), group_size, scale)
    assert adv.dtype == torch.float32 and adv.shape == rewards.shape
    assert all_equal.dtype == torch.bool and all_equal.shape == (n_groups,)
    assert_close(adv, gold, base, what=f"advantages G={group_size} {scale}")
    assert torch.equal(all_equal, gold_equal)
    assert (adv.view(n_groups, group_size)[all_equal] == 0).all()


def test_unbiased_std_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 2.0], device=DEVICE)
    adv, all_equal = group_advantages(rewards, 3, eps=0.0)
    std = (1 / 3) ** 0.5  # deviations 2/3, -1/3, -1/3: sum of squares 2/3, over G - 1 = 2
    expected = torch.tensor([(2 / 3) / std, (-1 / 3) / std, (-1 / 3) / std, 0.0, 0.0, 0.0], device=DEVICE)
    torch.testing.assert_close(adv, expected)
    assert all_equal.tolist() == [False, True]


def test_strided_and_integer_rewards():
    rewards = torch.arange(24, device=DEVICE).view(4, 6).t().reshape(-1)[::2]  # 12 ints, made contiguous
    adv, _ = group_advantages(rewards, 4, "none")
    gold, _ = reference.group_advantages(rewards.double(), 4, "none")
    torch.testing.assert_close(adv.double(), gold)


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.ones(6), 1), "group_size must be an int >= 2"),
        ((torch.ones(6), 0), "group_size must be an int >= 2"),
        ((torch.ones(6), 2.0), "group_size must be an int >= 2"),
        ((torch.ones(7), 2), "does not divide"),
        ((torch.ones(2, 3), 3), "1-D"),
        ((torch.ones(6), 3, "batch"), "scale='batch' is unknown"),
        ((torch.ones(6), 3, "group", -1.0), "eps"),
        ((torch.ones(6, dtype=torch.bool), 3), "real numbers"),
    ],
)
def test_bad_inputs_raise(args, match):
    rewards, *rest = args
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards.to(DEVICE), *rest)
