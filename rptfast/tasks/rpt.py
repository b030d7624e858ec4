"""Reinforcement Pre-Training: next-token reasoning on samples written by `rptfast prepare`.

Prompt i of the stream is a pure function of (seed, i): epoch e = i // N over the N training
samples, and a permutation of them seeded by (seed, e), so a resumed run or another rank
count sees the same prompts in the same places, and every epoch is a fresh shuffle. Prompts
are the sample's context in data.template, chat-wrapped, cut to data.max_prompt_tokens
(rptfast.data.templates). A completion earns data.reward: the paper's prefix match, or the
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
from rptfast.data.tokens import token_bytes
from rptfast.eval import accuracy_mode, reasoning_rewards, sample_scorer, summarize
from rptfast.reward import escape, reward
from rptfast.rollout import SamplingConfig
from rptfast.tasks import Prompt


class RPTTask:
    name = "rpt"

    def __init__(self, tokenizer, data_cfg, rollout_cfg, seed: int):
        self.store = SampleStore(data_cfg.samples)
        check_tokenizer(self.store, tokenizer, "the policy")
        check_lengths(data_cfg.max_prompt_tokens, rollout_cfg.max_tokens, rollout_cfg.max_model_len)
        self.tokenizer = tokenizer
        self.build = PromptBuilder(tokenizer, data_cfg.template, data_cfg.max_prompt_tokens, token_bytes(tokenizer))
        self.mode = accuracy_mode(data_cfg.reward)
        self.rollout = rollout_cfg
        self.ntp = data_cfg.rpt_ntp
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

    def pretrain_samples(self, start: int, count: int) -> list[tuple[list[int], list[int]]]:
        """(prompt, target) token ids of prompts start .. start+count-1, as data.rpt_ntp says (module docstring)."""
        eos = self.tokenizer.eos_token_id
        if self.ntp == "answers" and eos is None:
            raise ConfigError("data.rpt_ntp = 'answers' ends each boxed answer with EOS, and the policy's tokenizer "
                              "has none; set eos_token in its tokenizer_config.json, or use data.rpt_ntp = 'text'")
        out = []
        for p in self.prompts(start, count):
            if self.ntp == "text":
                text = p.meta["context_ids"] + p.meta["truth_ids"][:1]
                out.append((text[:1], text[1:]))
            else:
                first = p.meta["truth"][:p.meta["boundaries"][0]].decode("utf-8")
                answer = self.tokenizer.encode(self.build.answer_at_once(escape(first)), add_special_tokens=False)
                out.append((p.token_ids, answer + [eos]))
        return out

    def score(self, prompt: Prompt, completion: list[int]) -> float:
        text = self.build.scored_text(self.tokenizer.decode(completion, skip_special_tokens=False))
        return reward(text, prompt.meta["truth"], prompt.meta["boundaries"], self.mode)

    def evaluate(self, engine, count: int, seed: int) -> dict[str, float]:
        """Random@1 (one completion at rollout.temperature) on held-out samples, overall and by split."""
        heldout = len(self.eval_rows) > 0
        rows = self.store.spread(self.eval_rows if heldout else self.train_rows, count, self.seed)
        samples = [self.store.get(int(r)) for r in rows]
        sampling = SamplingConfig(self.rollout.temperature, self.rollout.top_p, self.rollout.max_tokens)
        rewards, _, _, stats = reasoning_rewards(engine, [self.build(s["context_ids"]) for s in samples],
                                                 sample_scorer(self.tokenizer, samples, self.mode, self.build.prefill),
                                                 1, sampling, seed)
        splits = summarize(self.store.entropy[rows], None, rewards)
        out = {"random@1": splits["all"]["random@1"], "heldout": float(heldout), **stats}
        out.update({f"random@1/{name}": row["random@1"] for name, row in splits.items()
                    if name != "all" and row["samples"]})
        return out
