"""Answer extraction and the prefix-matching reward of the RPT paper (Eq. 3).

Reward, on bytes: g is the ground-truth continuation's UTF-8 bytes, L the cumulative byte
lengths of its tokens (the valid boundaries, stored by `rptfast prepare`). A prediction y of
byte length l earns 1 iff y == g[:l] and l is in L, else 0. A prediction may span several
tokens but must end where a token ends. data.reward = "first_token" asks for exactly the
first token instead (l == L[0]); the paper found the two "generally comparable".

Extraction: the answer is the content of the last `\\boxed{...}` after the first `</think>`.
- Braces nest (`\\boxed{f(x)={a}}` gives `f(x)={a}`); a backslash escapes the character after
  it, as in LaTeX, so `\\{` and `\\}` do not open or close (`\\boxed{\\{}` gives `\\{`).
  Content is returned verbatim: no stripping, since a leading space is part of a token.
- No `</think>`: no answer, reward 0. The template asks for reasoning, then the answer; a
  completion without `</think>` was cut off while reasoning (max_tokens), and the
  "candidates" template asks the model to list candidates while it thinks, so taking a box
  from the reasoning would reward listing many guesses.
- The first `</think>` ends the reasoning (so a ground truth that contains `</think>` can be
  boxed). Several boxes after it: the last one. If the last one never closes (truncated),
  no answer: the model was still writing it.
- An empty box gives "", which earns 0 (no valid boundary has length 0).
- `\\text{...}` is not unwrapped: the templates say not to use it, and LaTeX corpora contain
  `\\text{` as ground truth, so unwrapping would make those answers ambiguous. The content is
  compared literally, so `\\boxed{\\text{ para}}` earns 1 only if the text says `\\text{ para}`.

Every token can be written (the rule the templates state): a box's content is read two ways,
and the answer earns the better of the two.
- verbatim, escapes kept: what LaTeX ground truth needs (`\\boxed{\\{}` is the text `\\{`,
  `\\boxed{\\frac{1}{2}}` the text `\\frac{1}{2}`);
- unescaped: `\\{`, `\\}` and `\\\\` read as `{`, `}` and `\\`, every other backslash kept.
  This is how a token with a brace or a backslash that does not pair up is written:
  `\\boxed{\\}}` is `}`, `\\boxed{\\{}` is `{`, `\\boxed{\\\\}` is `\\`. `escape()` writes any
  text this way, and `unescape(escape(s)) == s` for every s.
Whitespace is written as it is (`\\boxed{ }`, a newline inside the box). A token that holds
part of a multi-byte character (byte-level BPE) is never a boundary on its own (prepare keeps
only boundaries between characters), so it is written together with the tokens that complete
the character. The two readings differ only where a box holds `\\{`, `\\}` or `\\\\`; both
are literal strings, so the second reading adds one guess, never a pattern.
Left out, as in the paper: a format penalty (a missing or malformed answer simply earns 0).

Inline completions (data.template = "inline", RLP's format `x_<t <think> c </think> x_t`) have no box: after
the close the text simply goes on. The prediction is that continuation, cut where the model's own tokens
first cover the first true token: the bytes of its tokens after the close, up to the first token that ends
at or past the first boundary L[0] (a token that straddles the close counts from the close on). It earns what
Eq. 3 gives those bytes: 1 iff they are a prefix of the truth ending on one of its boundaries. So ` para`
earns 1 against ` para|meter`, so do ` p` `ara` and a single token ` parameter`, and ` paragraph` earns 0
although its first bytes match: a prediction ends where the model's token ends, as the paper's does where
the box closes. No escaping is needed: the bytes are the text's own. No close, or EOS before the first true
token is covered: 0. The update trains on the thought, the close and the prediction's tokens, not on the
text the model goes on to write (inline_reward returns where the prediction ends).
"""

from __future__ import annotations

from collections.abc import Sequence

THINK_END = "</think>"
BOX = "\\boxed{"
ESCAPES = {"{": "{", "}": "}", "\\": "\\"}  # the character after a backslash -> what the pair stands for


def escape(text: str) -> str:
    """The documented way to box any text: backslash before every brace and backslash."""
    return "".join("\\" + c if c in ESCAPES else c for c in text)


def unescape(answer: str) -> str:
    """The unescaped reading of a box's content: `\\{` `\\}` `\\\\` -> `{` `}` `\\`; other backslashes kept."""
    out, i = [], 0
    while i < len(answer):
        if answer[i] == "\\" and i + 1 < len(answer) and answer[i + 1] in ESCAPES:
            out.append(ESCAPES[answer[i + 1]])
            i += 2
        else:
            out.append(answer[i])
            i += 1
    return "".join(out)


def extract_answer(text: str) -> str | None:
    """The last \\boxed{} content after the first </think>; None when there is none."""
    end = text.find(THINK_END)
    if end < 0:
        return None
    answer = text[end + len(THINK_END):]
    start = answer.rfind(BOX)
    if start < 0:
        return None
    i = start + len(BOX)
    depth, out = 1, []
    while i < len(answer):
        c = answer[i]
        if c == "\\" and i + 1 < len(answer):
            out.append(answer[i:i + 2])
            i += 2
            continue
        depth += (c == "{") - (c == "}")
        if depth == 0:
            return "".join(out)
        out.append(c)
        i += 1
    return None


def prefix_reward(prediction: str | None, truth: bytes, boundaries: Sequence[int]) -> float:
    """Eq. 3: 1 iff the prediction's bytes are a prefix of truth ending on a valid boundary."""
    if prediction is None:
        return 0.0
    y = prediction.encode("utf-8")
    return float(len(y) in boundaries and truth.startswith(y))


def first_token_reward(prediction: str | None, truth: bytes, boundaries: Sequence[int]) -> float:
    """1 iff the prediction is exactly the first ground-truth token (bytes truth[:boundaries[0]])."""
    if prediction is None:
        return 0.0
    return float(prediction.encode("utf-8") == truth[:boundaries[0]])


def inline_reward(completion: Sequence[int], token_bytes: Sequence[bytes], close: bytes, eos: int | None,
                  truth: bytes, boundaries: Sequence[int], mode: str = "prefix") -> tuple[float, int]:
    """(reward, completion tokens through the prediction's end) of an inline completion (module docstring);
    without a close or a prediction, the second is the whole completion."""
    data, ends = b"", []
    for t in completion:
        if t == eos:
            break
        data += token_bytes[t]
        ends.append(len(data))
    at = data.find(close)
    if at < 0:
        return 0.0, len(completion)
    begin = at + len(close)
    for k, end in enumerate(ends):
        if end - begin >= boundaries[0]:
            y = data[begin:end]
            ok = y == truth[:boundaries[0]] if mode == "first_token" else len(y) in boundaries and truth.startswith(y)
            return float(ok), k + 1
    return 0.0, len(completion)


def reward(text: str, truth: bytes, boundaries: Sequence[int], mode: str = "prefix") -> float:
    """Reward of a decoded completion: mode is data.reward (prefix | first_token); the better of the box's
    verbatim and unescaped readings."""
    score = first_token_reward if mode == "first_token" else prefix_reward
    answer = extract_answer(text)
    if answer is None:
        return 0.0
    plain = unescape(answer)
    return max(score(answer, truth, boundaries), score(plain, truth, boundaries) if plain != answer else 0.0)
