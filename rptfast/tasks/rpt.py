"""Reinforcement Pre-Training: next-token reasoning on samples written by `rptfast prepare`.

Prompt i of the stream is a pure function of (seed, i): epoch e = i // N over the N training
samples, and a permutation of them seeded by (seed, e), so a resumed run or another rank
count sees the same prompts in the same places, and every epoch is a fresh shuffle. Prompts
are the sample's context in data.template, chat-wrapped (or raw, then `<think>`, for "inline"), cut to
data.max_prompt_tokens (rptfast.data.templates). A completion earns data.reward: the paper's prefix match, or the
first-token match (rptfast.reward); with "info_gain" (RLP) the trainer replaces the reward by the
thought's information gain (rptfast.train.info_gain) and score() is the prefix match, kept for accuracy.

The next-token phase (train.ntp_steps, before RL) trains on the same prompt stream, one sequence per
prompt, as data.rpt_ntp says:
- "text": the context the prompt keeps, then the true next token, as plain text (no template), every
  token after the first scored: next-token training on the store's contexts. A control for RPT of as
  many steps sees the positions RPT sees, and the text before them.
- "answers": the prompt, then the true next token (its first whole-character piece, escaped as the
  templates say) boxed after an empty thought, and EOS; the completion's tokens scored. A format
  warm-up for a chat model that has never seen `</think>`: it teaches the answer format, and the
  answer itself, by supervision (so it is also the supervised counterpart of RPT on the same prompts).
- "thoughts": the transparent-thought warm-up for the inline template (docs/rpt.md has the study that chose
  it). The text the prompt keeps and the truth after it, with data.thought_spans thoughts inserted between
  its tokens: one at the sample's own position (where RL will think), the others at random character
  boundaries. A thought is `<think>`, its content, `</think>`; its content is the next 1-3 true tokens with
  probability data.thought_hint (a hint: the model learns to read what a thought says), the model's own
  sampled thought with probability data.thought_sampled (what RL will sample there: the model learns how
  much such a thought is worth, so that its own thoughts do not mislead it before RL has shaped them), and
  nothing otherwise (the model learns that a thought costs it nothing). The text is scored, every token
  after the first, including each token right after a close, and with data.thought_close the close's own
  tokens after a thought that has content (the model learns to end a thought, which RPT's reward needs,
  but not to close one at once: scored after empty thoughts too, the close became the model's first
  choice after the opener, every thought it wrote was empty, and RL had nothing to tell apart); the
  opener and the thoughts' content are not scored: what to write in a thought is RL's to teach.

evaluate() runs one completion per held-out sample (the documents prepare set aside), `count`
of them drawn across documents with the run's seed (SampleStore.spread, as `rptfast eval`
draws them), and reports Random@1 overall and by the paper's entropy splits (rptfast.eval).
A store without held-out documents is evaluated on `count` training samples instead, and the
metrics say so ("heldout": 0).
"""

from __future__ import annotations

import numpy as np

from rptfast.config import ConfigError
from rptfast.data.store import SampleStore, check_tokenizer
from rptfast.data.templates import PromptBuilder, check_lengths
from rptfast.eval import accuracy_mode, reasoning_rewards, sample_scorer, summarize
from rptfast.model import Sequence
from rptfast.reward import escape, inline_reward, reward
from rptfast.rollout import SamplingConfig, sample_seed
from rptfast.tasks import Prompt


class RPTTask:
    name = "rpt"

    def __init__(self, tokenizer, data_cfg, rollout_cfg, seed: int):
        self.store = SampleStore(data_cfg.samples)
        check_tokenizer(self.store, tokenizer, "the policy")
        check_lengths(data_cfg.max_prompt_tokens, rollout_cfg.max_tokens, rollout_cfg.max_model_len)
        self.tokenizer = tokenizer
        self.build = PromptBuilder.of(tokenizer, data_cfg)
        self.mode = accuracy_mode(data_cfg.reward)
        self.rollout = rollout_cfg
        self.ntp = data_cfg.rpt_ntp
        self.spans, self.hint, self.sampled = data_cfg.thought_spans, data_cfg.thought_hint, data_cfg.thought_sampled
        self.score_close = data_cfg.thought_close
        self.seed = seed
        self.train_rows = self.store.rows("train")
        if len(self.train_rows) == 0:
            raise ConfigError(f"{data_cfg.samples} has no training samples (all are held out); prepare it with a "
                              f"smaller prepare.eval_fraction")
        self.eval_rows = self.store.rows("eval")
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def row(self, index: int) -> int:
        """Store row of prompt `index`: a seeded permutation of the training samples per epoch."""
        epoch, j = divmod(index, len(self.train_rows))
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.train_rows))
        return int(self.train_rows[self._perm[j]])

    def prompt(self, index: int, row: int) -> Prompt:
        """The sample's prompt; meta holds what the rewards need: the truth's bytes and token boundaries (prefix),
        its token ids and the context the prompt kept (info_gain), and where that context sits (ntp_coef)."""
        s = self.store.get(row)
        context = self.build.context(s["context_ids"])
        start = len(self.build.pre)
        return Prompt(index, self.build.pre + context + self.build.post,
                      {"row": row, "truth": s["continuation_bytes"], "boundaries": s["boundaries"],
                       "entropy": s["entropy"], "truth_ids": list(s["continuation_ids"]), "context_ids": context,
                       "context_span": (start, start + len(context))})

    def prompts(self, start: int, count: int) -> list[Prompt]:
        return [self.prompt(i, self.row(i)) for i in range(start, start + count)]

    def pretrain_samples(self, start: int, count: int, engine=None) -> list[Sequence]:
        """The sequences of prompts start .. start+count-1, as data.rpt_ntp says (module docstring); `engine`
        samples the thoughts of the warm-up that has the model's own (data.thought_sampled)."""
        eos = self.tokenizer.eos_token_id
        if self.ntp == "answers" and eos is None:
            raise ConfigError("data.rpt_ntp = 'answers' ends each boxed answer with EOS, and the policy's tokenizer "
                              "has none; set eos_token in its tokenizer_config.json, or use data.rpt_ntp = 'text'")
        prompts = self.prompts(start, count)
        if self.ntp == "thoughts":
            return self.with_thoughts(prompts, engine)
        out = []
        for p in prompts:
            if self.ntp == "text":
                out.append(Sequence(p.meta["context_ids"] + p.meta["truth_ids"][:1], 1))
            else:
                first = p.meta["truth"][:p.meta["boundaries"][0]].decode("utf-8")
                answer = self.tokenizer.encode(self.build.answer_at_once(escape(first)), add_special_tokens=False)
                out.append(Sequence(p.token_ids + answer + [eos], len(p.token_ids)))
        return out

    def with_thoughts(self, prompts: list[Prompt], engine) -> list[Sequence]:
        """The warm-up sequences: each prompt's context and truth with thoughts inserted, the text scored."""
        plans = []  # per prompt: its text, and the thought before text[j] for every cut j (None: to be sampled)
        tb = self.build.token_bytes
        for p in prompts:
            text = p.meta["context_ids"] + p.meta["truth_ids"]
            at = len(p.meta["context_ids"])
            rng = np.random.default_rng([self.seed, p.index, 2])
            starts = [j for j in range(1, len(text)) if j != at and (tb[text[j]][:1] or b"\0")[0] & 0xC0 != 0x80]
            cuts = sorted({at, *rng.choice(starts, size=min(self.spans - 1, len(starts)), replace=False).tolist()})
            thoughts = {}
            for j in cuts:
                u = rng.random()
                thoughts[j] = (text[j:j + int(rng.integers(1, 4))] if u < self.hint else
                               None if u < self.hint + self.sampled else [])
            plans.append((p, text, thoughts))
        wanted = [(i, j) for i, (_, _, th) in enumerate(plans) for j, t in th.items() if t is None]
        if wanted:  # the model's own thoughts at those places, as RL would sample them
            if engine is None:
                raise ValueError("data.thought_sampled > 0 needs the rollout engine to sample thoughts")
            r = self.rollout
            got = engine.generate([plans[i][1][:j] + self.build.open for i, j in wanted], 1,
                                  SamplingConfig(r.temperature, r.top_p, r.max_tokens),
                                  [sample_seed(self.seed, "thought", plans[i][0].index, j) for i, j in wanted])
            for c in got:
                i, j = wanted[c.prompt_index]
                plans[i][2][j] = self.build.thought(c.token_ids, self.tokenizer.eos_token_id)[0]
        out = []
        for _, text, thoughts in plans:
            tokens, skip = [text[0]], []
            for j in range(1, len(text)):
                if j in thoughts:
                    span = self.build.open + thoughts[j] + self.build.close
                    # the close is scored after a thought's content only: scored after an empty thought too, it
                    # teaches the model to close at once, and a model that never writes a thought gives RL nothing
                    # to tell apart
                    scored_close = self.score_close and thoughts[j]
                    unscored = len(span) - len(self.build.close) if scored_close else len(span)
                    skip += range(len(tokens), len(tokens) + unscored)
                    tokens += span
                tokens.append(text[j])
            out.append(Sequence(tokens, 1, skip=tuple(skip)))
        return out

    def score(self, prompt: Prompt, completion: list[int]) -> float:
        if self.build.inline:
            return self.inline(prompt, completion)[0]
        text = self.build.scored_text(self.tokenizer.decode(completion, skip_special_tokens=False))
        return reward(text, prompt.meta["truth"], prompt.meta["boundaries"], self.mode)

    def trained_length(self, prompt: Prompt, completion: list[int]) -> int:
        """Completion tokens the update trains on: inline, the thought, the close and the prediction (the text
        the model goes on to write is no part of its answer); otherwise all of them."""
        return self.inline(prompt, completion)[1] if self.build.inline else len(completion)

    def inline(self, prompt: Prompt, completion: list[int]) -> tuple[float, int]:
        return inline_reward(completion, self.build.token_bytes, self.build.close_bytes, self.tokenizer.eos_token_id,
                             prompt.meta["truth"], prompt.meta["boundaries"], self.mode)

    def evaluate(self, engine, count: int, seed: int) -> dict[str, float]:
        """Random@1 (one completion at rollout.temperature) on held-out samples, overall and by split."""
        heldout = len(self.eval_rows) > 0
        rows = self.store.spread(self.eval_rows if heldout else self.train_rows, count, self.seed)
        samples = [self.store.get(int(r)) for r in rows]
        sampling = SamplingConfig(self.rollout.temperature, self.rollout.top_p, self.rollout.max_tokens)
        rewards, _, _, stats, _ = reasoning_rewards(engine, [self.build(s["context_ids"]) for s in samples],
                                                    sample_scorer(self.tokenizer, samples, self.mode, self.build),
                                                    1, sampling, seed)
        splits = summarize(self.store.entropy[rows], None, rewards)
        out = {"random@1": splits["all"]["random@1"], "heldout": float(heldout), **stats}
        out.update({f"random@1/{name}": row["random@1"] for name, row in splits.items()
                    if name != "all" and row["samples"]})
        return out
