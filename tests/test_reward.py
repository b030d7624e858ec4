"""Answer extraction and the prefix-matching reward (the paper's Eq. 3), with property tests."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rptfast.reward import extract_answer, first_token_reward, prefix_reward, reward


@pytest.mark.parametrize("text, answer", [
    ("<think>hmm</think>\\boxed{ para}", " para"),                        # leading space kept
    ("a\n</think>\nThe answer is \\boxed{ para}.", " para"),
    ("</think>\\boxed{f(x)={a}+{b}}", "f(x)={a}+{b}"),                    # nested braces
    ("</think>\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("</think>\\boxed{\\{}", "\\{"),                                      # an escaped brace does not open
    ("</think>\\boxed{a\\}b}", "a\\}b"),                                  # ... nor close
    ("</think>\\boxed{ x}\\boxed{ y}", " y"),                            # several boxes: the last
    ("\\boxed{ no}</think>\\boxed{ yes}", " yes"),                       # boxes in the reasoning do not count
    ("</think>first</think>\\boxed{ two}", " two"),                      # after the last </think>
    ("</think>\\boxed{}", ""),                                            # empty box
    ("</think>\\boxed{\\text{ para}}", "\\text{ para}"),                  # \text{} is not unwrapped
    ("reasoning \\boxed{ para} cut off", None),                          # no </think>
    ("</think>no box here", None),
    ("</think>\\boxed{ x}\\boxed{ y", None),                             # the last box never closes
    ("</think>\\boxed{a{b}", None),
    ("", None),
])
def test_extract(text, answer):
    assert extract_answer(text) == answer


TRUTH = b" paragraph one"
BOUNDS = [4, 10, 13, 14]  # " par" "agraph" " on" "e"


@pytest.mark.parametrize("pred, prefix, first", [
    (" par", 1.0, 1.0),
    (" paragraph", 1.0, 0.0),         # two tokens, ends on a boundary
    (" paragraph one", 1.0, 0.0),     # all of it
    (" para", 0.0, 0.0),              # a prefix, but not at a boundary
    ("par", 0.0, 0.0),                # missing the space
    (" paragraph one two", 0.0, 0.0),  # longer than the truth
    ("", 0.0, 0.0),
    (None, 0.0, 0.0),
])
def test_prefix_and_first_token(pred, prefix, first):
    assert prefix_reward(pred, TRUTH, BOUNDS) == prefix
    assert first_token_reward(pred, TRUTH, BOUNDS) == first


def test_reward_on_completion_text():
    assert reward("<think>candidates: para, graph</think>\n\\boxed{ paragraph}", TRUTH, BOUNDS) == 1.0
    assert reward("<think>x</think>\\boxed{ paragraph}", TRUTH, BOUNDS, "first_token") == 0.0
    assert reward("<think>x</think>\\boxed{ par}", TRUTH, BOUNDS, "first_token") == 1.0
    assert reward("\\boxed{ par}", TRUTH, BOUNDS) == 0.0  # no </think>: no answer


# ground truth as tokens: non-empty texts (multi-byte characters included); boundaries are their cumulative lengths
tokens = st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=6)


@settings(max_examples=300, deadline=None)
@given(tokens)
def test_prefixes_at_boundaries_score_one(toks):
    truth = "".join(toks).encode()
    bounds = [len("".join(toks[:i + 1]).encode()) for i in range(len(toks))]
    for i in range(len(toks)):
        pred = "".join(toks[:i + 1])
        assert prefix_reward(pred, truth, bounds) == 1.0
        text = f"<think>{pred}?</think>\\boxed{{{pred}}}"
        if extract_answer(text) == pred:  # predictions with unbalanced braces or backslashes cannot be boxed as is
            assert reward(text, truth, bounds) == 1.0


@settings(max_examples=300, deadline=None)
@given(tokens, st.text(max_size=12))
def test_anything_else_scores_zero(toks, pred):
    truth = "".join(toks).encode()
    bounds = [len("".join(toks[:i + 1]).encode()) for i in range(len(toks))]
    y = pred.encode()
    expected = float(len(y) in bounds and truth[:len(y)] == y)
    assert prefix_reward(pred, truth, bounds) == expected
    # every byte prefix of the truth that is not at a boundary scores 0
    text = truth.decode()
    for cut in range(len(text) + 1):
        p = text[:cut]
        if len(p.encode()) not in bounds:
            assert prefix_reward(p, truth, bounds) == 0.0
