"""Answer extraction and the prefix-matching reward (the paper's Eq. 3), with property tests."""

import functools
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from rptfast.data.tokens import char_starts, raw_text_encoder, token_bytes
from rptfast.reward import escape, extract_answer, first_token_reward, prefix_reward, reward, unescape
from rptfast.testing import write_tokenizer


@pytest.mark.parametrize("text, answer", [
    ("<think>hmm</think>\\boxed{ para}", " para"),                        # leading space kept
    ("a\n</think>\nThe answer is \\boxed{ para}.", " para"),
    ("</think>\\boxed{f(x)={a}+{b}}", "f(x)={a}+{b}"),                    # nested braces
    ("</think>\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("</think>\\boxed{\\{}", "\\{"),                                      # an escaped brace does not open
    ("</think>\\boxed{a\\}b}", "a\\}b"),                                  # ... nor close
    ("</think>\\boxed{ x}\\boxed{ y}", " y"),                            # several boxes: the last
    ("\\boxed{ no}</think>\\boxed{ yes}", " yes"),                       # boxes in the reasoning do not count
    ("</think>first</think>\\boxed{ two}", " two"),                      # the last box after the first </think>
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


# --- every token can be answered: the documented way (reward.escape) earns 1 at every boundary ---

SPECIAL = ["{", "}", "\\", "\\{", "\\}", "\\\\", " ", "  ", "\n", "\n\n", "\t", " {", "}}", "\\frac{1}{2}",
           "\\text{", "é", "中文", "🙂", "\u0301", " \\boxed{", "</think>"]


@functools.lru_cache(maxsize=1)
def _bpe():
    """The tiny byte-level BPE of rptfast.testing: (encoder, token bytes, ids of tokens that decode as text)."""
    path = tempfile.mkdtemp(prefix="rptfast-bpe-")
    write_tokenizer(path, "bpe", 512)
    tok = AutoTokenizer.from_pretrained(path)
    tb = token_bytes(tok)
    return raw_text_encoder(tok), tb


def _truth(ids: list[int], tb: list[bytes]) -> tuple[bytes, list[int]]:
    """g and its valid boundaries as prepare stores them: token ends that sit between characters."""
    g = b"".join(tb[i] for i in ids)
    offsets = np.concatenate([[0], np.cumsum([len(tb[i]) for i in ids])])
    ok = char_starts(g, offsets)
    return g, [int(offsets[j + 1]) for j in range(len(ids)) if ok[j + 1]]


def _check_every_boundary(g: bytes, bounds: list[int]) -> None:
    for n, cut in enumerate(bounds):
        text = g[:cut].decode("utf-8")
        answer = f"<think>hm</think>\\boxed{{{escape(text)}}}"
        assert extract_answer(answer) == escape(text) and unescape(escape(text)) == text
        assert reward(answer, g, bounds) == 1.0
        if n == 0:
            assert reward(answer, g, bounds, "first_token") == 1.0


pieces = st.one_of(st.sampled_from(SPECIAL), st.text(min_size=1, max_size=3))


@settings(max_examples=150, deadline=None)
@given(st.lists(pieces, min_size=1, max_size=6), st.data())
def test_every_token_of_real_tokenizations_can_be_answered(parts, data):
    """Random text (braces, backslashes, whitespace, multi-byte characters) through the tiny BPE: the first token
    (and any boundary prefix) of every position that starts a character, written the documented way, earns 1."""
    enc, tb = _bpe()
    text = "".join(parts)
    ids = enc.encode(text, add_special_tokens=False).ids
    assert b"".join(tb[i] for i in ids) == text.encode()
    offsets = np.concatenate([[0], np.cumsum([len(tb[i]) for i in ids])])
    starts = [t for t in range(len(ids)) if char_starts(text.encode(), offsets)[t]]
    t = data.draw(st.sampled_from(starts))
    g, bounds = _truth(ids[t:], tb)
    assert bounds  # the text ends on a character, so the last token always closes one
    _check_every_boundary(g, bounds)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 511), min_size=1, max_size=8))
def test_every_vocabulary_token_can_be_answered(ids):
    """Ground truths drawn straight from the vocabulary (single bytes included: partial UTF-8, lone braces and
    backslashes); where they join into text, every valid boundary earns 1 when written the documented way."""
    _, tb = _bpe()
    g, bounds = _truth(ids, tb)
    try:
        g.decode("utf-8")
    except UnicodeDecodeError:  # prepare only reads UTF-8 text: keep the longest prefix that is text
        good = [b for b in bounds if _decodes(g[:b])]
        g, bounds = g[:good[-1]] if good else b"", good
    if bounds:
        _check_every_boundary(g, bounds)


def _decodes(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@pytest.mark.parametrize("truth, box", [
    ("}", "\\}"), ("{", "\\{"), ("\\", "\\\\"), ("}}", "\\}\\}"),     # the unescaped reading
    ("\\{", "\\{"), ("\\}", "\\}"), ("\\frac{1}{2}", "\\frac{1}{2}"),       # literal LaTeX, verbatim
    ("\\{", "\\\\\\{"), ("\\frac{1}{2}", "\\\\frac\\{1\\}\\{2\\}"),  # ... or escaped
    (" ", " "), ("\n", "\n"), ("\t", "\t"),                                # whitespace as it is
])
def test_special_tokens_have_an_answer(truth, box):
    g = truth.encode()
    assert reward(f"</think>\\boxed{{{box}}}", g, [len(g)]) == 1.0


def test_the_second_reading_adds_no_free_reward():
    g = b"}x"
    assert reward("</think>\\boxed{\\}}", g, [1, 2]) == 1.0
    assert reward("</think>\\boxed{\\{}", g, [1, 2]) == 0.0
    assert reward("</think>\\boxed{\\\\}", b"\\\\", [1, 2]) == 1.0  # the truth \\ : "\\\\" unescapes to "\\"


def utf8_kinds(b: bytes) -> set[str]:
    """Why a token's bytes cannot stand alone as UTF-8 text, read off the bit patterns (0b10xxxxxx continues a
    character; 110, 1110, 11110 lead 2-, 3- and 4-byte ones; C0, C1, F5-FF occur in no UTF-8 text)."""
    kinds = set()
    if any(x in (0xC0, 0xC1) or x >= 0xF5 for x in b):
        kinds.add("never_in_utf8")
    if b and b[0] >> 6 == 0b10:
        kinds.add("starts_mid_character")
    j = len(b) - 1
    while j >= 0 and b[j] >> 6 == 0b10:
        j -= 1
    if j >= 0:
        need = 2 if b[j] >> 5 == 0b110 else 3 if b[j] >> 4 == 0b1110 else 4 if b[j] >> 3 == 0b11110 else 1
        if len(b) - j < need:
            kinds.add("ends_mid_character")
    return kinds


def test_every_smollm2_token_earns_one_when_boxed(smollm2_dir):
    """The real vocabulary (49152 ids): at a position whose next token is id i (ground truth: token i, then " the"),
    the box holding token i's text written the documented way (reward.escape) earns 1, prefix and first_token.

    The exceptions, predicted from the bytes and then checked to be exactly the ids that fail:
    - byte-level pieces of a multi-byte character (they start or end inside one; measured 313: 74 start mid-character,
      239 end mid-character). Their bytes decode to U+FFFD, so no text can spell them, and prepare never asks for
      them alone: a position whose token starts or ends inside a character is dropped (mid_character), and a later
      token's boundary only counts where a character ends.
    - special tokens (17: <|endoftext|>, <|im_start|>, ...): their text would earn 1, but they are never a ground
      truth, since prepare encodes documents with special-token text read as plain text (raw_text_encoder)."""
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tb = token_bytes(tok)
    enc = raw_text_encoder(tok)
    assert len(tb) == 49152 and all(tb)
    follow = b"".join(tb[i] for i in enc.encode(" the").ids)
    failed = set()
    for i, b in enumerate(tb):
        g, bounds = _truth_of(b, follow)
        answer = f"<think>the next token</think>\\boxed{{{escape(b.decode('utf-8', 'replace'))}}}"
        if not (reward(answer, g, bounds) == 1.0 and reward(answer, g, bounds, "first_token") == 1.0):
            failed.add(i)
    kinds = {i: utf8_kinds(b) for i, b in enumerate(tb)}
    predicted = {i for i, k in kinds.items() if k}
    assert failed == predicted == {i for i, b in enumerate(tb) if not _decodes(b)}
    assert 0 < len(failed) < 1000
    special = {i for i, t in tok.backend_tokenizer.get_added_tokens_decoder().items() if t.special}
    assert special and not special & failed
    for i in special:  # never a ground truth: the text of a special token in a document is plain text
        assert i not in enc.encode(tb[i].decode()).ids


def _truth_of(token: bytes, follow: bytes) -> tuple[bytes, list[int]]:
    """g and its valid boundaries for a position whose next tokens are `token` then `follow`, as prepare stores them."""
    g = token + follow
    offsets = np.array([0, len(token), len(g)])
    ok = char_starts(g, offsets)
    return g, [int(o) for o, fine in zip(offsets[1:], ok[1:]) if fine]
