"""RPT's own effect at CPU scale: a corpus with reducible and irreducible entropy (`make demo-rpt`).

The corpus. A document is 2 to 6 records, one per line; a record is a modulus m, six digits
below m, and their sum mod m:

    3:120211=1
    5:403122=1
    2:101101=0

Each character is one token of the toy tokenizer (rptfast.testing), and its true next-token
distribution is known:
- irreducible: the modulus (uniform over 2, 3, 5: ln 3 = 1.10 nats) and the digits (uniform
  below m: ln m = 0.69, 1.10 or 1.61 nats). Nothing predicts them better than chance, with or
  without reasoning.
- reducible: the answer after "=". It is a function of the 6 digits before it (entropy 0), but
  a model that does not compute it sees ln m, like a digit. Next-token training on sums of 6
  digits mod m learns the format long before the function (the parity study of
  rptfast.tasks.parity is the case m = 2 at 16 digits); a chain of running sums, one digit
  per step, makes it easy.
- fixed: ":", "=", the line break (only whether the document ends there is uncertain: a line
  break after the second to fifth answer).
So each of the paper's entropy splits holds both kinds: a proxy that cannot compute puts the
answers of m = 2 in easy (> 0.5), m = 3 in medium (> 1.0) and m = 5 in hard (> 1.5), beside the
digits and moduli of the same entropy. Position kinds are read back from the context alone
(`kind`): a context that ends with "=" asks for a reducible token.

The base model. `data.task = "toy"` is next-token pre-training (train.ntp_steps) from scratch
on this corpus, with a share data.toy_demos of sequences that are next-token-reasoning
demonstrations in the rollout format: the prompt a policy sees in RPT (PromptBuilder with
data.template), then a thought, `</think>`, `\\boxed{answer}` and EOS. ANSWER_SHARE of them are at
an answer, the rest at a digit or a modulus, where the thought is empty since there is nothing to
compute. At an answer the thought is the running sums mod m (the computation worked out); from step
data.toy_think_from on, only a share data.toy_think of the answers are worked, the rest answered at
once (an empty thought, then the true answer). So the base learns the computation first (it needs
most answers worked out to learn it at all: docs/rpt.md), then is calibrated to use it rarely: it
thinks at an answer about toy_think of the time, like the parity study's p_cot, and its reasoning
mode is no better than plain prediction (R1-Distill's was far worse for the paper: 1.41 against
20.43 on hard). What RPT can teach it is when a thought pays.

Evaluation during pre-training (`evaluate`): fresh documents from a stream disjoint from the
training one, one position per document, drawn as the demonstrations' are (ANSWER_SHARE
answers, the rest other random positions); plain (greedy next token on the raw context) and reasoning (one completion
at rollout.temperature, scored with the prefix reward) accuracy, by kind, how often a completion
thinks (a non-empty thought), and how often a thought is right. The paper's Table 1
comes from `rptfast eval` on a prepared store instead (`table`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from rptfast.data.templates import PromptBuilder
from rptfast.errors import ConfigError, atomic_path
from rptfast.model import Sequence
from rptfast.reward import reward
from rptfast.rollout import SamplingConfig
from rptfast.tasks import Prompt

MODULI = (2, 3, 5)
DIGITS = 6  # digits per record
RECORDS = (2, 6)  # records per document, both ends included
EVAL_OFFSET = 10**12  # evaluation documents come from a stream disjoint from pre-training's
CORPUS_OFFSET = 10**13  # `rptfast toy corpus` (what prepare, RPT and eval see) is disjoint from both
KINDS = ("reducible", "random")
ANSWER_SHARE = 0.75  # demonstrations at answers (a worked sum); the rest at random positions (an empty thought)


def document(seed: int, index: int) -> str:
    """Document `index` of the stream seeded by `seed`: records joined by line breaks."""
    rng = np.random.default_rng([seed, index])
    lines = []
    for _ in range(int(rng.integers(RECORDS[0], RECORDS[1] + 1))):
        m = int(rng.choice(MODULI))
        x = rng.integers(0, m, DIGITS)
        lines.append(f"{m}:{''.join(map(str, x))}={int(x.sum()) % m}")
    return "\n".join(lines)


def truth(text: str) -> list[tuple[str, float]]:
    """Per character after the first: (kind, entropy in nats of its true next-token distribution).

    kind is "reducible" (an answer), "random" (a digit or a modulus) or "fixed" (":", "=", a line break).
    """
    out = []
    for i in range(1, len(text)):
        line_start = text.rfind("\n", 0, i) + 1
        col = i - line_start
        if col == 0:
            out.append(("random", math.log(len(MODULI))))
        elif text[i - 1] == "=":
            out.append(("reducible", 0.0))
        elif 2 <= col < 2 + DIGITS:
            out.append(("random", math.log(int(text[line_start]))))
        else:  # ":", "=", and the line break (whose small entropy is the document's length)
            out.append(("fixed", 0.0))
    return out


def kind(context: str) -> str:
    """What a context asks for: "reducible" when it ends with "=", else "random" (for positions prepare keeps)."""
    return "reducible" if context.endswith("=") else "random"


def thought(record_prefix: str) -> str:
    """The worked computation for a context that ends with "m:digits=": running sums mod m."""
    m, digits = int(record_prefix[0]), record_prefix[2:2 + DIGITS]
    sums = np.cumsum([int(c) for c in digits]) % m
    return "".join(map(str, sums))


def write_corpus(path: str | Path, documents: int, seed: int) -> Path:
    """`documents` documents as JSONL ({"text": ...} per line), written to a temporary name and renamed."""
    path = Path(path)
    if path.suffix != ".jsonl":
        raise ConfigError(f"--out {str(path)!r}: the toy corpus is JSONL; name the file *.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tmp.open("w") as f:
        for i in range(documents):
            f.write(json.dumps({"text": document(seed, CORPUS_OFFSET + i)}) + "\n")
    return path


class ToyTask:
    """Next-token pre-training on the toy corpus with a share of reasoning demonstrations. No RL prompts
    (config.check refuses train.steps > 0 for it), so nothing is scored but the evaluation."""

    name = "toy"

    def __init__(self, tokenizer, data_cfg, rollout_cfg, seed: int, sequences_per_step: int):
        self.tokenizer = tokenizer
        self.seed = seed
        self.demos, self.think = data_cfg.toy_demos, data_cfg.toy_think
        self.think_from = data_cfg.toy_think_from * sequences_per_step  # the first sequence index toy_think applies to
        self.build = PromptBuilder.of(tokenizer, data_cfg)
        self.rollout = rollout_cfg
        self.encode = lambda s: tokenizer.encode(s, add_special_tokens=False)
        if tokenizer.unk_token_id in self.encode("0123456789:=\n</think>\\boxed{}"):
            raise ConfigError("data.task = 'toy' needs the toy tokenizer (model.scratch_tokenizer = 'toy', or a "
                              "model made with it)")
        # the longest context: a whole document ("m:digits=a" and a line break per record) but its last character
        longest, wrap = RECORDS[1] * (DIGITS + 5) - 2, data_cfg.max_prompt_tokens - self.build.budget
        if self.build.budget < longest:
            raise ConfigError(f"data.max_prompt_tokens ({data_cfg.max_prompt_tokens}) cuts toy documents: the longest "
                              f"context is {longest} tokens and the wrapping {wrap}; raise it to {longest + wrap}")
        need = DIGITS + len(self.encode("</think>\\boxed{0}")) + 1
        if rollout_cfg.max_tokens < need:
            raise ConfigError(f"rollout.max_tokens ({rollout_cfg.max_tokens}) cannot hold a worked answer of {need} "
                              f"tokens; raise it")

    def positions(self, text: str, rng: np.random.Generator) -> tuple[int, str]:
        """A position that prepare could keep: an answer (reducible) with probability ANSWER_SHARE, else random."""
        kinds = truth(text)
        want = "reducible" if rng.random() < ANSWER_SHARE else "random"
        at = [i + 1 for i, (k, _) in enumerate(kinds) if k == want]
        pos = int(rng.choice(at))
        return pos, want

    def demonstration(self, text: str, pos: int, worked: bool) -> tuple[list[int], list[int]]:
        """(prompt, target): the RPT prompt for the context text[:pos], then the answer, worked out at an answer
        when `worked`, else at once (an empty thought)."""
        context = text[:pos]
        work = thought(context[context.rfind("\n") + 1:]) if worked and kind(context) == "reducible" else ""
        return self.build(self.encode(context)), self.encode(f"{work}</think>\\boxed{{{text[pos]}}}") + [
            self.tokenizer.eos_token_id]

    def pretrain_samples(self, start: int, count: int) -> list[Sequence]:
        """Sequence i: a demonstration with probability data.toy_demos (its prompt unscored), else document i
        (first token unscored).

        A demonstration at an answer works the sum out, from step data.toy_think_from on with probability
        data.toy_think only."""
        out = []
        for i in range(start, start + count):
            rng = np.random.default_rng([self.seed, i, 1])
            text = document(self.seed, i)
            if rng.random() < self.demos:
                pos, _ = self.positions(text, rng)
                prompt, target = self.demonstration(text, pos, worked=rng.random() < self.think or i < self.think_from)
                out.append(Sequence(prompt + target, len(prompt)))
            else:
                out.append(Sequence(self.encode(text), 1))
        return out

    def prompts(self, start: int, count: int) -> list[Prompt]:
        raise ConfigError("data.task = 'toy' is next-token pre-training only (train.steps = 0); RPT runs on the "
                          "prepared store with data.task = 'rpt'")

    def evaluate(self, engine, count: int, seed: int) -> dict[str, float]:
        """Plain and reasoning accuracy on `count` fresh positions, by kind (half reducible, half random)."""
        texts, pos, kinds = [], [], []
        for i in range(count):
            rng = np.random.default_rng([self.seed, EVAL_OFFSET + seed * count + i, 1])
            text = document(self.seed, EVAL_OFFSET + seed * count + i)
            p, k = self.positions(text, rng)
            texts.append(text)
            pos.append(p)
            kinds.append(k)
        contexts = [self.encode(t[:p]) for t, p in zip(texts, pos)]
        plain = engine.generate(contexts, 1, SamplingConfig(temperature=0.0, max_tokens=1),
                                seeds=[seed + i for i in range(count)])
        right_plain = np.array([self.tokenizer.decode(c.token_ids) == t[p] for c, t, p in zip(plain, texts, pos)])
        sampling = SamplingConfig(self.rollout.temperature, self.rollout.top_p, self.rollout.max_tokens)
        comps = engine.generate([self.build(c) for c in contexts], 1, sampling, seeds=[seed + i for i in range(count)])
        completions = [self.build.scored_text(self.tokenizer.decode(c.token_ids, skip_special_tokens=False))
                       for c in comps]
        right_reason = np.array([reward(c, t[p].encode(), [1]) for c, t, p in zip(completions, texts, pos)])
        thinks = np.array([not c.startswith("</think>") for c in completions])
        kinds = np.array(kinds)
        out = {}
        for k in KINDS:
            mask = kinds == k
            out[f"plain/{k}"] = float(right_plain[mask].mean())
            out[f"reasoning/{k}"] = float(right_reason[mask].mean())
            out[f"thinks/{k}"] = float(thinks[mask].mean())
        worked = thinks & (kinds == "reducible")
        if worked.any():  # accuracy of the thoughts themselves, whatever their share
            out["reasoning/reducible/thinking"] = float(right_reason[worked].mean())
        out["response_len"] = float(np.mean([len(c.token_ids) for c in comps]))
        return out


# ---------------------------------------------------------------- the table (the paper's Table 1)

ROWS = (  # (label, which evaluation, which mode)
    ("next-token prediction, base", "base", "plain"),
    ("next-token reasoning, before RPT", "base", "random@1"),
    ("next-token reasoning, after RPT", "rpt", "random@1"),
    ("next-token prediction, base + NTP control", "control", "plain"),
)
LENGTHS = (("completion tokens, before RPT", "base"), ("completion tokens, after RPT", "rpt"))  # how much it thinks


def sample_kinds(store, rows) -> tuple[np.ndarray, np.ndarray]:
    """[N] kind ("reducible" | "random") and [N] stored entropy of the store rows an evaluation drew."""
    rows = np.asarray(rows)
    return np.array([kind(store.get(int(r))["context"]) for r in rows]), store.entropy[rows]


def cells(result: dict, kinds: np.ndarray, entropy: np.ndarray, mode: str) -> dict[tuple[str, str], tuple]:
    """(split, kind) -> (accuracy, positions) of one evaluation's per-sample results."""
    from rptfast.data.store import split_masks

    values = result["per_sample"].get(mode)
    if values is None:
        raise ConfigError(f"{result['model']}: its evaluation ran without mode {mode!r}; rerun rptfast eval with "
                          f"eval.plain and eval.reasoning on")
    values = np.asarray(values, dtype=float)
    out = {}
    for split, mask in split_masks(entropy).items():
        for k in ("all", *KINDS):
            m = mask & (kinds == k) if k != "all" else mask
            out[split, k] = (float(values[m].mean()) if m.any() else float("nan"), int(m.sum()))
    return out


def table(evals: dict[str, Path], data: str, out_dir: Path, rpt_run: Path | None = None) -> str:
    """Table 1 from the eval JSONs of the base, the RPT model and the control on the same samples.

    evals: "base" | "rpt" | "control" -> the JSON `rptfast eval` wrote. Writes rpt_toy_table.txt and
    .json into out_dir, and the RPT run's curves when rpt_run is given.
    """
    from rptfast.data.store import SampleStore, write_json
    from rptfast.errors import PathError

    results = {}
    for name, path in evals.items():
        if not Path(path).is_file():
            raise PathError(f"--{name} {str(path)!r}: no evaluation there; run rptfast eval on that model first")
        results[name] = json.loads(Path(path).read_text())
    rows = {tuple(r["per_sample"]["row"]) for r in results.values()}
    if len(rows) != 1:
        raise ConfigError("the evaluations were made on different samples (eval.samples, eval.split or train.seed "
                          "differ); evaluate all three with the same config")
    kinds, entropy = sample_kinds(SampleStore(data), next(iter(rows)))
    grid = {label: cells(results[which], kinds, entropy, mode) for label, which, mode in ROWS}
    lengths = {label: cells(results[which], kinds, entropy, "response_len") for label, which in LENGTHS}
    splits = ("easy", "medium", "hard")
    width = max(len(label) for label, _, _ in ROWS)
    head = f"{'accuracy (%)':<{width}} " + " ".join(f"{s:>8}" for s in splits) + "   " + " ".join(
        f"{s + ' red.':>10} {s + ' rnd.':>10}" for s in splits)
    lines = [head, "-" * len(head)]
    for label, _, _ in ROWS:
        g = grid[label]
        lines.append(f"{label:<{width}} " + " ".join(f"{100 * g[s, 'all'][0]:8.2f}" for s in splits) + "   " +
                     " ".join(f"{100 * g[s, 'reducible'][0]:10.2f} {100 * g[s, 'random'][0]:10.2f}" for s in splits))
    g = grid[ROWS[0][0]]
    lines.append(f"{'positions':<{width}} " + " ".join(f"{g[s, 'all'][1]:8d}" for s in splits) + "   " +
                 " ".join(f"{g[s, 'reducible'][1]:10d} {g[s, 'random'][1]:10d}" for s in splits))
    for label, _ in LENGTHS:
        g = lengths[label]
        lines.append(f"{label:<{width}} " + " ".join(f"{g[s, 'all'][0]:8.1f}" for s in splits) + "   " +
                     " ".join(f"{g[s, 'reducible'][0]:10.1f} {g[s, 'random'][0]:10.1f}" for s in splits))
    lines.append("splits: the base's entropy at the position (easy > 0.5, medium > 1.0, hard > 1.5 nats, nested); "
                 "red. = reducible (an answer), rnd. = random (a digit or a modulus); held-out documents; an answer "
                 f"given at once is 5 tokens, a worked one {DIGITS + 5}")
    text = "\n".join(lines)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "rpt_toy_table.txt").write_text(text + "\n")
    write_json(out_dir / "rpt_toy_table.json", {
        "rows": {label: {f"{s}/{k}": {"accuracy": a, "positions": n} for (s, k), (a, n) in grid[label].items()}
                 for label, _, _ in ROWS},
        "lengths": {label: {f"{s}/{k}": mean for (s, k), (mean, _) in lengths[label].items()} for label, _ in LENGTHS},
        "evals": {name: str(path) for name, path in evals.items()}, "data": str(data)})
    if rpt_run is not None:
        curves(rpt_run, out_dir)
    return text


def curves(run_dir: Path, out_dir: Path) -> None:
    """Reward, held-out accuracy by split and completion length against step, from the RPT run's metrics.jsonl."""
    from rptfast.metrics import plot, read_jsonl
    from rptfast.report import curves as reward_curves

    reward_curves(run_dir, out_dir, prefix="rpt_toy_")
    plot(read_jsonl(run_dir), {"train": "response_len", "held-out": "eval/response_len"},
         out_dir / "rpt_toy_length.png", "completion tokens (5: at once, 11: worked)")
