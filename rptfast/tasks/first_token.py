"""A built-in task with a learnable signal, for testing the trainer on any model.

Prompts are random token sequences; the reward is 1 when the completion's first token
id is below `data.first_token_set`. A random policy starts near first_token_set / vocab;
the policy can learn it within a few steps by raising those rows of lm_head.
"""

from __future__ import annotations

import numpy as np

from rptfast.rollout import SamplingConfig
from rptfast.tasks import Prompt


class FirstTokenTask:
    name = "first_token"

    def __init__(self, tokenizer, data_cfg, rollout_cfg, seed: int):
        self.vocab = len(tokenizer)
        self.specials = set(tokenizer.all_special_ids)
        self.k = data_cfg.first_token_set
        self.length = data_cfg.prompt_len
        self.max_tokens = rollout_cfg.max_tokens
        self.seed = seed

    def prompts(self, start: int, count: int) -> list[Prompt]:
        out = []
        for i in range(start, start + count):
            rng = np.random.default_rng([self.seed, i])
            ids = [int(t) for t in rng.integers(0, self.vocab, self.length) if int(t) not in self.specials]
            out.append(Prompt(i, ids or [0]))
        return out

    def score(self, prompt: Prompt, completion: list[int]) -> float:
        return float(len(completion) > 0 and completion[0] < self.k)

    def evaluate(self, engine, count: int, seed: int) -> dict[str, float]:
        """Greedy and sampled reward on prompts from a held-out part of the stream."""
        prompts = self.prompts(10**9 + seed * count, count)
        ids = [p.token_ids for p in prompts]
        out = {}
        for mode, temp in (("greedy", 0.0), ("sampled", 1.0)):
            comps = engine.generate(ids, 1, SamplingConfig(temperature=temp, max_tokens=1),
                                    seeds=[seed + i for i in range(count)])
            out[f"{mode}_reward"] = float(np.mean([self.score(p, c.token_ids) for p, c in zip(prompts, comps)]))
        return out
