"""Prompt templates for next-token reasoning, chosen by name (data.template).

Each template is a user message with a `{context}` slot, wrapped in the policy's chat
template with thinking on (`enable_thinking=True`: the generation prompt opens `<think>`
where the template knows the flag), so the completion is reasoning, `</think>`, then the
answer in `\\boxed{}`. Two templates also pre-fill the start of the assistant's turn (PREFILLS),
for a chat model that has never seen `<think>`: the prefill is part of the prompt, and the
reward reads it in front of the completion (`PromptBuilder.scored_text`).

- "v0": the paper's v0 (its main runs), in substance: complete the text under "### Context" by
  predicting the next token, reason step by step, the most probable next token in \\boxed{},
  a leading space allowed (\\boxed{ para}, \\boxed{ =}), no \\text{}; then "### Context" and
  the context. One sentence is ours, in every template but "bare": how to box a brace, a backslash or
  whitespace (rptfast.reward: without it a token such as `}` could not be answered at all).
- "candidates": v0 plus "list several candidates for the next token and weigh them", an idea
  from the paper's other templates (rptfast's v0 before it followed the paper).
- "multi": the same task stated for the prefix-matching reward: the next token or the next
  few, scored byte for byte, so predict only as far as you are sure.
- "context_first": the context first, the instruction after it, nearest to the answer.
- "bare": the context alone, no instructions: for a model trained from scratch that knows no
  English (rptfast.tasks.toy); the chat wrapping and the open thought mark the task.
- "answer": thought budget 0. A short instruction (the next token in \\boxed{}, its leading space
  kept), and the assistant's turn pre-filled with `<think>\\n</think>\\n\\boxed{`, so the completion is
  the token and `}` (and EOS). What is left to the model is the answer and where the box closes.
- "think": the format stated in words (think briefly, close with `</think>`, then the box) and the
  assistant's turn pre-filled with `<think>\\n`, so the thought is open from the first token.
- "inline": RLP's format (arXiv 2510.01265), for base models: no chat template and no instruction. The
  prompt is the raw context, then data.think_open; the completion is the thought, data.think_close, then
  the text itself goes on: `x_<t <think> c </think> x_t`. The reward reads the continuation right after the
  close (rptfast.reward.inline_reward), no box. The markers are tokenized on their own, between the
  document's own tokens, so the context and the truth keep the ids prepare stored (the warm-up and the
  evaluation insert them the same way).
A chat template whose generation prompt opens `<think>` itself (R1-Distill's) gets the prefill
without its own `<think>`: never two. Neither works for a 135M instruct model without a format
warm-up (docs/rpt.md, "On a real model", has what each earned); "answer" is what rptfast's
warm-up (data.rpt_ntp = "answers") demonstrates.

The paper found initial accuracy differs by up to 2x between templates, hence the choice.

The context is cut from the left at a token boundary so that the whole prompt (chat
wrapping and instructions included) is at most data.max_prompt_tokens tokens: prompt ids are
the template's tokens before the slot, the last context tokens as tokenized within the
document, and the template's tokens after it. The cut moves right past any token that starts
inside a multi-byte character, so the context always starts with a whole character.
"""

from __future__ import annotations

from rptfast.config import ConfigError
from rptfast.data.tokens import token_bytes

ESCAPE_RULE = ("Write a brace or a backslash that is part of the token as \\{, \\} or \\\\, and spaces or line "
               "breaks as they are.")  # rptfast.reward.escape: every token has an answer that earns 1

TEMPLATES = {
    "v0": (
        "Complete the given text under \"### Context\" by predicting the next token. Think step by step, then "
        "put the most probable next token inside \\boxed{}. The token may begin with a space, for example "
        "\\boxed{ para} or \\boxed{ =}. Do not use \\text{}. " + ESCAPE_RULE +
        "\n\n### Context\n{context}"
    ),
    "candidates": (
        "Complete the text under \"### Context\" by predicting the next token. Think step by step: list "
        "several candidates for the next token and weigh them. Then give the single most probable next token "
        "inside \\boxed{}. The token may begin with a space, for example \\boxed{ para}. Do not use \\text{}. "
        + ESCAPE_RULE + "\n\n### Context\n{context}"
    ),
    "multi": (
        "Continue the text under \"### Context\". Reason about what comes next, then write the next token, or "
        "the next few tokens, inside \\boxed{} exactly as they would appear in the text, with the leading "
        "space if there is one (for example \\boxed{ the}). The prediction is checked byte for byte and must "
        "end where a token ends, so predict only as far as you are sure. Do not use \\text{}. " + ESCAPE_RULE +
        "\n\n### Context\n{context}"
    ),
    "context_first": (
        "{context}\n\n---\nThe text above breaks off. Think about how it goes on, then give its next token "
        "inside \\boxed{}, keeping a leading space if the token has one (for example \\boxed{ para}). "
        "Do not use \\text{}. " + ESCAPE_RULE
    ),
    "bare": "{context}",
    "answer": (
        "Predict the next token of the text under \"### Context\" and give it inside \\boxed{}, with its "
        "leading space if it has one. " + ESCAPE_RULE + "\n\n### Context\n{context}"
    ),
    "think": (
        "Predict the next token of the text under \"### Context\". Think about it briefly, then write </think> "
        "and the token inside \\boxed{}, with its leading space if it has one, for example </think>\\boxed{ the}. "
        + ESCAPE_RULE + "\n\n### Context\n{context}"
    ),
    "inline": "{context}",  # no chat wrapping: the raw context, then data.think_open (PromptBuilder)
}
INLINE = "inline"
THINK_OPEN, ANSWER_OPEN = "<think>\n", "</think>\n\\boxed{"
PREFILLS = {"answer": THINK_OPEN + ANSWER_OPEN, "think": THINK_OPEN}  # the assistant's turn, begun for the model

SLOT = "{context}"
SENTINEL = "\u2063RPTFAST-CONTEXT\u2063"  # stands in for the context while the chat template renders


class PromptBuilder:
    """Prompt token ids for a context, within data.max_prompt_tokens."""

    def __init__(self, tokenizer, name: str, max_prompt_tokens: int, token_bytes: list[bytes],
                 think_open: str = "<think>", think_close: str = "</think>"):
        if name not in TEMPLATES:
            raise ConfigError(f"data.template = {name!r} is not a template; choose one of {', '.join(TEMPLATES)}")
        self.token_bytes = token_bytes
        self.inline = name == INLINE
        self.open = tokenizer.encode(think_open, add_special_tokens=False)  # the markers' own ids
        self.close = tokenizer.encode(think_close, add_special_tokens=False)
        self.close_bytes = think_close.encode("utf-8")
        if self.inline:
            self.prefill, self.pre, self.post = "", [], list(self.open)
            self._set_budget(max_prompt_tokens, name)
            return
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("the policy tokenizer has no chat template; RPT prompts are chat-wrapped with "
                              "thinking on, so use a chat (reasoning) model or add a chat_template")
        message = TEMPLATES[name].replace(SLOT, SENTINEL)
        chat = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=True)
        if chat.count(SENTINEL) != 1:
            raise ConfigError(f"the policy's chat template does not keep the user message verbatim, so the "
                              f"context slot of template {name!r} cannot be found in it")
        pre, _, post = chat.partition(SENTINEL)
        prefill = PREFILLS.get(name, "")
        if prefill.startswith(THINK_OPEN) and post.rstrip().endswith(THINK_OPEN.strip()):
            prefill = prefill[len(THINK_OPEN):]  # the generation prompt opened the thought already
        self.prefill = prefill  # text of the completion's start that the prompt holds
        self.pre = tokenizer.encode(pre, add_special_tokens=False)
        self.post = tokenizer.encode(post + prefill, add_special_tokens=False)
        self._set_budget(max_prompt_tokens, name)

    @classmethod
    def of(cls, tokenizer, data_cfg, template: str | None = None, tb: list[bytes] | None = None) -> PromptBuilder:
        """The builder data_cfg describes (data.template unless `template` says otherwise, data.max_prompt_tokens,
        the thought markers)."""
        return cls(tokenizer, template or data_cfg.template, data_cfg.max_prompt_tokens,
                   token_bytes(tokenizer) if tb is None else tb, data_cfg.think_open, data_cfg.think_close)

    def _set_budget(self, max_prompt_tokens: int, name: str) -> None:
        self.budget = max_prompt_tokens - len(self.pre) - len(self.post)
        if self.budget < 1:
            raise ConfigError(f"data.max_prompt_tokens = {max_prompt_tokens} leaves no room for the context: "
                              f"template {name!r} with its wrapping takes {len(self.pre) + len(self.post)} "
                              f"tokens; raise it")

    def context(self, context_ids: list[int]) -> list[int]:
        """The context tokens the prompt keeps: the last ones that fit, from a character start."""
        cut = len(context_ids) - min(len(context_ids), self.budget)
        while cut < len(context_ids) - 1 and (self.token_bytes[context_ids[cut]][:1] or b"\0")[0] & 0xC0 == 0x80:
            cut += 1  # this token starts inside a character
        return list(context_ids[cut:])

    def __call__(self, context_ids: list[int]) -> list[int]:
        return self.pre + self.context(context_ids) + self.post

    def thought(self, completion: list[int], eos: int | None) -> tuple[list[int], int, bool]:
        """(the completion's thought: what it wrote before its first data.think_close, or, cut at the budget or
        ended by EOS without one, all it sampled but the EOS; how many sampled tokens the thought spans, its
        close included when sampled; whether the model closed it). The close is matched on its own token ids,
        as the prompts, the warm-up and the evaluation write it. Scoring appends the close (self.close)."""
        n = len(self.close)
        for i in range(len(completion) - n + 1):
            if completion[i:i + n] == self.close:
                return list(completion[:i]), i + n, True
        body = completion[:-1] if completion and completion[-1] == eos else completion
        return list(body), len(completion), False

    def scored_text(self, completion: str) -> str:
        """What the reward reads: the prefill, then the completion."""
        return self.prefill + completion

    def answer_at_once(self, answer: str) -> str:
        """The completion that gives `answer` (as boxed: escaped) after an empty thought, in this template's format."""
        return (answer if self.prefill.endswith(ANSWER_OPEN) else ANSWER_OPEN + answer) + "}"


def check_lengths(max_prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    """A full prompt plus a full completion must fit the engine."""
    if max_prompt_tokens + max_tokens > max_model_len:
        raise ConfigError(f"data.max_prompt_tokens ({max_prompt_tokens}) + rollout.max_tokens ({max_tokens}) "
                          f"exceeds rollout.max_model_len ({max_model_len}); raise max_model_len or lower the others")
