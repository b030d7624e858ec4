"""Parity: the study of RL after next-token prediction (arXiv 2510.11495) at CPU scale.

Input: d uniform bits, then "=". Target, with probability p_cot the long chain of
thought: the running parities x1, x1^x2, ..., x1^...^xd, then EOS (d + 1 tokens);
otherwise the short answer: the parity, then EOS.

Both forms begin with a bit, so after pre-training the first token is x1 with
probability (1 + p_cot) / 2 whatever the form, and the model must then choose between
going on (long) and EOS (short). It goes on with probability 2 p_cot / (1 + p_cot),
which greedy decoding picks only when p_cot > 1/3: below that, greedy answers short,
and the short answer to d-bit parity is what next-token training cannot learn in
reasonable time. That is the threshold the paper finds; RL with a reward on the final
answer moves the choice to the long form.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rptfast.metrics import plot, read_jsonl
from rptfast.model import Sequence
from rptfast.rollout import SamplingConfig
from rptfast.tasks import Prompt

EVAL_OFFSET = 10**12  # evaluation inputs come from a stream disjoint from training's


class ParityTask:
    name = "parity"

    def __init__(self, tokenizer, data_cfg, rollout_cfg, seed: int):
        self.d = data_cfg.parity_d
        self.p_cot = data_cfg.parity_p_cot
        self.reward = data_cfg.parity_reward
        self.seed = seed
        self.bit = [tokenizer.convert_tokens_to_ids(c) for c in "01"]
        self.eq = tokenizer.convert_tokens_to_ids("=")
        self.eos = tokenizer.eos_token_id
        if None in self.bit or self.eq is None or tokenizer.unk_token_id in (*self.bit, self.eq):
            raise ValueError("the parity task needs a tokenizer with the tokens '0', '1' and '=' "
                             "(model.scratch_tokenizer = 'char')")
        if rollout_cfg.max_tokens < self.d + 1:
            raise ValueError(f"rollout.max_tokens ({rollout_cfg.max_tokens}) cannot hold the long chain of "
                             f"d + 1 = {self.d + 1} tokens; raise it")
        self.max_tokens = rollout_cfg.max_tokens

    def bits(self, index: int) -> np.ndarray:
        return np.random.default_rng([self.seed, index]).integers(0, 2, self.d)

    def prompt_ids(self, x: np.ndarray) -> list[int]:
        return [self.bit[b] for b in x] + [self.eq]

    def long_target(self, x: np.ndarray) -> list[int]:
        return [self.bit[b] for b in np.cumsum(x) % 2] + [self.eos]

    def short_target(self, x: np.ndarray) -> list[int]:
        return [self.bit[int(x.sum() % 2)], self.eos]

    def prompts(self, start: int, count: int) -> list[Prompt]:
        out = []
        for i in range(start, start + count):
            x = self.bits(i)
            out.append(Prompt(i, self.prompt_ids(x), {"bits": x}))
        return out

    def pretrain_samples(self, start: int, count: int) -> list[Sequence]:
        """Prompt then target, the target scored; sample i is long with probability p_cot."""
        out = []
        for i in range(start, start + count):
            x = self.bits(i)
            long = np.random.default_rng([self.seed, i, 1]).random() < self.p_cot
            prompt = self.prompt_ids(x)
            out.append(Sequence(prompt + (self.long_target(x) if long else self.short_target(x)), len(prompt)))
        return out

    def answer(self, completion: list[int]) -> tuple[list[int] | None, bool]:
        """The bits before the first EOS (None if a non-bit token comes first), and whether EOS came."""
        out = []
        for t in completion:
            if t == self.eos:
                return out, True
            if t not in self.bit:
                return None, False
            out.append(self.bit.index(t))
        return out, False

    def score(self, prompt: Prompt, completion: list[int]) -> float:
        """answer: 1 when the last bit before EOS is the parity; chain: 1 when the whole chain is right.

        A completion without EOS (truncated) or with a non-bit token earns 0; tokens after the
        first EOS are ignored.
        """
        bits, stopped = self.answer(completion)
        if not stopped or not bits:
            return 0.0
        x = prompt.meta["bits"]
        if self.reward == "chain":
            return float(bits == [int(b) for b in np.cumsum(x) % 2])
        return float(bits[-1] == int(x.sum() % 2))

    def evaluate(self, engine, count: int, seed: int) -> dict[str, float]:
        """Greedy and sampled accuracy, share of long answers and mean response length on fresh inputs."""
        prompts = self.prompts(EVAL_OFFSET + seed * count, count)
        ids = [p.token_ids for p in prompts]
        out = {}
        for mode, temp in (("greedy", 0.0), ("sampled", 1.0)):
            comps = engine.generate(ids, 1, SamplingConfig(temperature=temp, max_tokens=self.max_tokens),
                                    seeds=[seed + i for i in range(count)])
            answers = [self.answer(c.token_ids)[0] or [] for c in comps]
            right = np.array([self.score(p, c.token_ids) for p, c in zip(prompts, comps)])
            long = np.array([len(a) >= self.d for a in answers])
            out[f"{mode}_acc"] = float(right.mean())
            out[f"{mode}_long_frac"] = float(long.mean())
            out[f"{mode}_long_acc"] = float(right[long].mean()) if long.any() else float("nan")
            out[f"{mode}_len"] = float(np.mean([len(c.token_ids) for c in comps]))
        return out

    def report(self, run_dir: Path, ntp_steps: int) -> str:
        """The table the study is about (after NTP, after RL) and two plots, written into run_dir."""
        rows = read_jsonl(run_dir)
        evals = [r for r in rows if "eval/greedy_acc" in r]
        marks = [("init", evals[0])]
        after_ntp = [r for r in evals if r["step"] == ntp_steps]
        if ntp_steps and after_ntp:
            marks.append((f"after NTP (step {ntp_steps})", after_ntp[0]))
        if evals[-1]["step"] > ntp_steps:
            marks.append((f"after RL (step {evals[-1]['step']})", evals[-1]))
        head = (f"{'parity d=' + str(self.d) + ' p_cot=' + str(self.p_cot):<26} {'greedy acc':>10} {'long':>6} "
                f"{'length':>7} {'sampled acc':>12} {'long':>6} {'length':>7}")
        lines = [head, "-" * len(head)]
        for name, r in marks:
            lines.append(f"{name:<26} {r['eval/greedy_acc']:>10.3f} {r['eval/greedy_long_frac']:>6.2f} "
                         f"{r['eval/greedy_len']:>7.2f} {r['eval/sampled_acc']:>12.3f} "
                         f"{r['eval/sampled_long_frac']:>6.2f} {r['eval/sampled_len']:>7.2f}")
        lines.append(f"(length counts EOS: the short answer is 2 tokens, the long chain d + 1 = {self.d + 1}; "
                     f"chance is 0.5)")
        table = "\n".join(lines)
        (run_dir / "parity_table.txt").write_text(table + "\n")
        boundary = ntp_steps if ntp_steps else None
        plot(evals, {"greedy": "eval/greedy_acc", "sampled": "eval/sampled_acc"}, run_dir / "parity_accuracy.png",
             "accuracy on fresh inputs", boundary, "NTP | RL")
        plot(evals, {"greedy": "eval/greedy_len", "sampled": "eval/sampled_len"}, run_dir / "parity_length.png",
             "mean response length (tokens)", boundary, "NTP | RL")
        return table
