"""`rptfast eval`: next-token accuracy on a sample store, plain and with reasoning, by difficulty.

    rptfast eval --model M --data DIR [--out FILE] [--config C] [--set eval.k=8 --set eval.samples=200 ...]

Both modes see the same context: the last context tokens that fit data.max_prompt_tokens with
data.template's wrapping (rptfast.data.templates), so their columns compare like for like.
The report gives the context lengths seen (mean, max) and the share of samples cut shorter
than stored.
(a) plain: an HF forward on each sample's context tokens (as tokenized within the document,
    no template); right when the greedy argmax of the next token is the ground truth's
    first token. Contexts are packed (no padding), eval.batch_tokens per forward.
(b) next-token reasoning: the context in data.template, eval.k completions per sample at
    rollout.temperature, up to rollout.max_tokens, through the rollout engine; each scored
    by data.reward (rptfast.reward). Random@1 is the mean reward over all completions
    (the expected accuracy of one sample), Pass@k the share of samples with one right.
The model's position limit bounds everything: rollout.max_model_len must fit it, and
data.max_prompt_tokens + rollout.max_tokens must fit rollout.max_model_len; both are checked
before any model loads.

With data.template = "inline" (thoughts in the raw text, RLP's format) the HF forward scores four modes, each
the greedy next token and the mean log-probability of the true one, so the cost of the format and the use of
a thought are always visible beside the gain of reasoning: plain (as in (a)); after an empty thought
(context, data.think_open, data.think_close: what the format alone costs); after an oracle thought (the true
next token written inside it: whether the model reads its thoughts); and after the model's own thoughts (with
eval.reasoning: the k thoughts of (b), cut at their close or closed at the budget; its Random@1 is RPT's
inline reward on the continuation the model wrote after the close). All modes of a context share one copy of
it in a prompt-once row. Each mode's accuracy and log p come with standard errors over samples (a sample's k
thoughts averaged first).

Both are reported for all samples and the paper's nested splits by entropy: easy (> 0.5),
medium (> 1.0), hard (> 1.5). The paper splits by the entropy of a larger model
(R1-Distill-Qwen-14B); here the entropy is the one stored by `rptfast prepare`, i.e. the
proxy's, so the splits follow the proxy. The JSON names it.

The samples are eval.split ("eval": the documents prepare held out); eval.samples = N draws N
of them across documents, seeded by train.seed (SampleStore.spread; 0 = all). A table goes to
the console with truncated_frac (completions cut by rollout.max_tokens, which score 0), the
numbers to a JSON file: --out, by default <model dir>/eval-<store name>.json (a hub name needs
--out), so evaluations of different models never overwrite each other. The JSON also holds each
sample's result (store row, plain right, Random@1), for breakdowns other than entropy
(rptfast.tasks.toy groups by position kind).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from rptfast.config import Config, ConfigError
from rptfast.data.store import SPLITS, SampleStore, check_tokenizer, split_masks, write_json
from rptfast.data.templates import PromptBuilder, check_lengths
from rptfast.errors import PathError, check_writable_dir
from rptfast.metrics import quiet_startup
from rptfast.model import (
    Sequence,
    collate,
    collate_shared,
    hidden_states,
    load_policy,
    pack,
    pack_shared,
    resolve_attn,
    resolve_dtype,
    shares_prompts,
)
from rptfast.reward import extract_answer, inline_reward, reward
from rptfast.rollout import SamplingConfig, check_model_dir, is_hub_name, make_engine

GENERATE_CHUNK = 16  # prompts per generate call (the progress bar moves per call; seeds are per prompt)


@torch.no_grad()
def next_token_scores(lm, seqs: list[Sequence], batch_tokens: int, bar=None) -> tuple[np.ndarray, np.ndarray]:
    """Of sequences that each score one token, their last: [N] whether the greedy argmax is that token and [N]
    its log-probability (fp32 softmax, temperature 1). Packed eval.batch_tokens to a forward; sequences with a
    common prompt (Sequence.prompt: a context and its k thoughts) hold it once where the backend can."""
    device = next(lm.parameters()).device
    shared = shares_prompts(lm)
    bins = (pack_shared if shared else pack)(seqs, batch_tokens)
    right, logp = np.zeros(len(seqs), dtype=bool), np.zeros(len(seqs))
    for idx in bins:
        mb = (collate_shared if shared else collate)(seqs, idx, device)
        hidden = hidden_states(lm, mb)  # [T, H]
        logits = lm.get_output_embeddings()(hidden.index_select(0, mb.pred_idx)).float()  # [B, V]: one row a sequence
        right[idx] = (logits.argmax(-1) == mb.targets).cpu().numpy()
        logp[idx] = logits.log_softmax(-1).gather(1, mb.targets[:, None])[:, 0].double().cpu().numpy()
        if bar is not None:
            bar.update(len(idx))
    return right, logp


def inline_sequences(build: PromptBuilder, contexts: list[list[int]], truths: list[int],
                     thoughts: list[list[int] | None]) -> list[Sequence]:
    """Context, data.think_open, thought, data.think_close, then the true next token, scored; a thought of None
    leaves the markers out (plain). A sequence's prompt is its context, which every mode and thought on the
    same context shares (prompt-once rows: the context's forward is done once for all of them)."""
    out = []
    for c, t, th in zip(contexts, truths, thoughts):
        head = list(c) if th is None else list(c) + build.open + list(th) + build.close
        out.append(Sequence(head + [t], len(head), prompt=len(c)))
    return out


def reasoning_rewards(engine, prompts: list[list[int]], score: Callable[[int, list[int]], tuple[float, bool]],
                      k: int, sampling: SamplingConfig, seed: int, bar=None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float], list[list[list[int]]]]:
    """[N, k] rewards, [N, k] token lengths and [N, k] answered (a box after `</think>`, or a closed inline
    thought) of k completions per prompt, the response length, truncation and answer-rate stats, and the
    completions' token ids [N][k]."""
    rewards, lengths = np.zeros((len(prompts), k)), np.zeros((len(prompts), k), dtype=np.int64)
    answered = np.zeros((len(prompts), k), dtype=bool)
    ids: list[list[list[int]]] = [[[] for _ in range(k)] for _ in prompts]
    comps = []
    for at in range(0, len(prompts), GENERATE_CHUNK):
        chunk = prompts[at:at + GENERATE_CHUNK]
        got = engine.generate(chunk, k, sampling, seeds=[seed + (at + i) * k for i in range(len(chunk))])
        for c in got:
            i, j = at + c.prompt_index, c.sample_index
            rewards[i, j], answered[i, j] = score(i, c.token_ids)
            lengths[i, j] = len(c.token_ids)
            ids[i][j] = list(c.token_ids)
        comps += got
        if bar is not None:
            bar.update(len(chunk))
    stats = {"response_len": float(lengths.mean()),
             "truncated_frac": float(np.mean([c.finish_reason == "length" for c in comps])),
             "answer_rate": float(answered.mean())}
    return rewards, lengths, answered, stats, ids


def summarize(entropy: np.ndarray, plain: np.ndarray | None, rewards: np.ndarray | None) -> dict[str, dict]:
    """Per split: sample count, plain accuracy, Random@1, Pass@k (None where not measured or empty)."""
    out = {}
    for name, mask in split_masks(entropy).items():
        n = int(mask.sum())
        row = {"samples": n, "plain": None, "random@1": None, "pass@k": None}
        if n and plain is not None:
            row["plain"] = float(plain[mask].mean())
        if n and rewards is not None:
            row["random@1"] = float(rewards[mask].mean())
            row["pass@k"] = float((rewards[mask] >= 1).any(axis=1).mean())
        out[name] = row
    return out


def mode_summary(entropy: np.ndarray, right: np.ndarray, logp: np.ndarray) -> dict[str, dict]:
    """Per split: samples, accuracy and mean log p of the true token, each with its standard error over samples
    ([N] per-sample values: a sample's k thoughts are averaged first, so k adds no false precision)."""
    out = {}
    for name, mask in split_masks(entropy).items():
        n = int(mask.sum())
        row = {"samples": n, "accuracy": None, "accuracy_se": None, "logp": None, "logp_se": None}
        if n:
            for key, v in (("accuracy", right[mask]), ("logp", logp[mask])):
                row[key] = float(v.mean())
                row[key + "_se"] = float(v.std(ddof=1) / np.sqrt(n)) if n > 1 else None
        out[name] = row
    return out


def inline_table(modes: dict[str, dict]) -> str:
    """Accuracy (%) and mean log p of the true token per inline mode and split, standard errors in brackets."""
    head = f"{'mode':<10} " + " ".join(f"{name:>22}" for name in SPLITS)
    lines = [head, "-" * len(head)]
    for mode, splits in modes.items():
        cells = []
        for name in SPLITS:
            r = splits[name]
            cells.append(f"{'-':>22}" if r["accuracy"] is None else
                         f"{100 * r['accuracy']:6.1f} ({100 * (r['accuracy_se'] or 0):3.1f}) {r['logp']:6.2f} "
                         f"({r['logp_se'] or 0:4.2f})")
        lines.append(f"{mode:<10} " + " ".join(cells))
    return "\n".join(lines)


def table(splits: dict[str, dict], k: int) -> str:
    pct = lambda v: f"{100 * v:8.2f}" if v is not None else f"{'-':>8}"  # noqa: E731
    head = f"{'split':<8} {'entropy':>8} {'samples':>8} {'plain':>8} {'random@1':>8} {'pass@' + str(k):>8}"
    lines = [head, "-" * len(head)]
    for name, row in splits.items():
        low = SPLITS[name]
        lines.append(f"{name:<8} {'any' if low is None else '> ' + str(low):>8} {row['samples']:>8} "
                     f"{pct(row['plain'])} {pct(row['random@1'])} {pct(row['pass@k'])}")
    return "\n".join(lines)


def accuracy_mode(reward_name: str) -> str:
    """The match that accuracy counts under data.reward: info_gain (RLP) trains on a log-prob gain, and its
    accuracy is the paper's prefix match."""
    return "prefix" if reward_name == "info_gain" else reward_name


def sample_scorer(tokenizer, samples: list[dict], mode: str, build: PromptBuilder
                  ) -> Callable[[int, list[int]], tuple[float, bool]]:
    """score(i, completion) -> (reward against sample i, whether it answers: a box after `</think>`, or for the
    inline template a closed thought); the prompt's prefill (PromptBuilder.prefill) is read in front of it."""
    eos = tokenizer.eos_token_id

    def score(i: int, completion: list[int]) -> tuple[float, bool]:
        truth, bounds = samples[i]["continuation_bytes"], samples[i]["boundaries"]
        if build.inline:
            r, _ = inline_reward(completion, build.token_bytes, build.close_bytes, eos, truth, bounds, mode)
            return r, build.thought(completion, eos)[2]
        text = build.prefill + tokenizer.decode(completion, skip_special_tokens=False)
        return reward(text, truth, bounds, mode), extract_answer(text) is not None
    return score


def eval_path(model: str, data: str, out: str | None) -> Path:
    """Where the JSON goes: --out, else into the model's own directory, named after the store."""
    if out:
        return Path(out)
    if is_hub_name(model):
        raise ConfigError(f"--model {model!r} is a hub name, not a local directory, so there is no model directory "
                          f"to write the results into; pass --out FILE")
    return Path(model) / f"eval-{Path(str(data).rstrip('/')).name}.json"


def run_eval(cfg: Config, model: str, data: str, out: str | None = None, engine=None,
             progress: bool | None = None) -> dict:
    """Evaluate `model` on the store `data`; print the table, write the JSON, return it.

    `engine` lets a caller reuse a started rollout engine on the same model (tests).
    """
    from tqdm import tqdm

    from rptfast.data.prepare import load_tokenizer

    e = cfg.eval
    # everything that can fail is checked before the first forward
    path = eval_path(model, data, out)
    limit = check_model_dir(model, cfg.rollout.max_model_len, key="--model")
    check_lengths(cfg.data.max_prompt_tokens, cfg.rollout.max_tokens if e.reasoning else 0, cfg.rollout.max_model_len)
    if path.is_dir():
        raise PathError(f"--out {str(path)!r} is a directory; give a JSON file path")
    check_writable_dir(path.parent, f"--out {str(path)!r}: its directory")
    store = SampleStore(data)
    tokenizer = load_tokenizer(model, cfg.model.trust_remote_code, "--model")
    check_tokenizer(store, tokenizer, f"model {model!r}")
    if e.reasoning and tokenizer.eos_token_id is None:
        raise ConfigError(f"the tokenizer of --model {model!r} has no EOS token, so completions never end; set "
                          f"eos_token in its tokenizer_config.json")
    rows = store.spread(store.rows(e.split), e.samples, cfg.train.seed)
    if len(rows) == 0:
        raise ConfigError(f"{data} has no samples in split {e.split!r}; set --set eval.split=train (or all), "
                          f"or prepare with prepare.eval_fraction > 0")
    samples = [store.get(int(r)) for r in rows]
    entropy = store.entropy[rows]
    # one context for both modes: what the template keeps of the stored context
    build = PromptBuilder.of(tokenizer, cfg.data)
    contexts = [build.context(s["context_ids"]) for s in samples]
    seen = np.array([len(c) for c in contexts])
    stored = np.array([len(s["context_ids"]) for s in samples])
    context = {"tokens_mean": float(seen.mean()), "tokens_max": int(seen.max()),
               "stored_tokens_mean": float(stored.mean()), "cut_frac": float((seen < stored).mean()),
               "budget": build.budget}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(cfg.model.dtype, device)
    show = progress if progress is not None else cfg.log.progress and sys.stderr.isatty()
    plain = rewards = lengths = answered = completions = None
    stats: dict[str, float] = {}
    if e.reasoning:
        own = engine is None
        if own:
            r = cfg.rollout
            with quiet_startup(cfg.log.verbose):
                engine = make_engine(r.engine, model, dtype=dtype, device=device, seed=cfg.train.seed,
                                     max_model_len=r.max_model_len, gpu_memory_utilization=r.gpu_memory_utilization,
                                     cpu_kv_cache_gib=r.cpu_kv_cache_gib, sleep_level=r.sleep_level,
                                     sync_bucket_mb=r.sync_bucket_mb, enforce_eager=r.enforce_eager,
                                     trust_remote_code=cfg.model.trust_remote_code)
        sampling = SamplingConfig(cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.max_tokens)
        try:
            with tqdm(total=len(samples), desc="eval reasoning", unit="sample", disable=not show,
                      dynamic_ncols=True) as bar:
                rewards, lengths, answered, stats, completions = reasoning_rewards(
                    engine, [build.pre + c + build.post for c in contexts],
                    sample_scorer(tokenizer, samples, accuracy_mode(cfg.data.reward), build), e.k, sampling,
                    cfg.train.seed, bar)
        finally:
            if own and hasattr(engine, "close"):
                engine.close()
    # HF forwards: plain, and for the inline template the true token after an empty thought, after an oracle
    # thought (the true token itself inside it) and after each of the model's own sampled thoughts
    modes: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # mode -> ([N] right, [N] log p), per-sample means
    if e.plain or build.inline and e.reasoning:
        lm = load_policy(model, dtype=dtype, attn=resolve_attn(cfg.model.attn, device, dtype),
                         trust_remote_code=cfg.model.trust_remote_code, gradient_checkpointing=False).to(device).eval()
        truths = [s["continuation_ids"][0] for s in samples]
        wanted = {}
        if e.plain:
            wanted["plain"] = [None] * len(samples)
            if build.inline:
                wanted["empty"], wanted["oracle"] = [[]] * len(samples), [[t] for t in truths]
        if build.inline and e.reasoning:
            wanted["reasoning"] = [build.thought(c, tokenizer.eos_token_id)[0] for ks in completions for c in ks]
            stats["thought_tokens"] = float(np.mean([len(t) for t in wanted["reasoning"]]))  # the close left out
        seqs, spans = [], {}
        for mode, thoughts in wanted.items():  # one forward pass for all modes, each context once
            reps = len(thoughts) // len(samples)  # k sampled thoughts a sample, else 1
            spans[mode] = (len(seqs), reps)
            seqs += inline_sequences(build, [c for c in contexts for _ in range(reps)],
                                     [t for t in truths for _ in range(reps)], thoughts)
        with tqdm(total=len(seqs), desc="eval forward", unit="seq", disable=not show, dynamic_ncols=True) as bar:
            right, logp = next_token_scores(lm, seqs, e.batch_tokens, bar)
        for mode, (at, reps) in spans.items():
            part = slice(at, at + reps * len(samples))
            modes[mode] = (right[part].reshape(-1, reps).mean(axis=1), logp[part].reshape(-1, reps).mean(axis=1))
        plain = modes["plain"][0] if e.plain else None
        del lm
        if device.type == "cuda":
            torch.cuda.empty_cache()
    splits = summarize(entropy, plain, rewards)
    inline = {mode: mode_summary(entropy, *v) for mode, v in modes.items()} if build.inline else None
    result = {
        "model": model,
        "data": str(data),
        "split": e.split,
        "samples": len(rows),
        "documents": int(len(np.unique(store.doc_index[rows]))),
        "entropy": f"top-{store.manifest['settings']['top_k']} entropy of the proxy {store.manifest['proxy']!r} "
                   f"(the paper splits by R1-Distill-Qwen-14B's)",
        "context": context,
        "model_max_len": limit,
        "template": cfg.data.template,
        "reward": accuracy_mode(cfg.data.reward) if e.reasoning else None,
        "k": e.k if e.reasoning else None,
        "temperature": cfg.rollout.temperature if e.reasoning else None,
        "max_tokens": cfg.rollout.max_tokens if e.reasoning else None,
        **stats,
        "splits": splits,
        # the inline template's modes: accuracy and log p of the true token, per split, with standard errors
        "inline": inline,
        # per sample, in the order drawn: its store row, plain right (0/1), mean reward and mean length in tokens
        # over the k completions; for each mode run by an HF forward, <mode> (right, averaged over thoughts) and
        # <mode>_logp
        "per_sample": {"row": [int(r) for r in rows],
                       **{m: v[0].round(6).tolist() for m, v in modes.items() if m != "plain"},
                       **{f"{m}_logp": v[1].round(6).tolist() for m, v in modes.items()},
                       "plain": None if plain is None else plain.astype(int).tolist(),
                       "random@1": None if rewards is None else rewards.mean(axis=1).round(6).tolist(),
                       "response_len": None if lengths is None else lengths.mean(axis=1).round(3).tolist(),
                       "answered": None if answered is None else answered.mean(axis=1).round(6).tolist()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    print(f"next-token accuracy (%), model {model}, {len(rows)} samples from {result['documents']} documents of "
          f"{data} ({e.split})")
    print(table(splits, e.k))
    if inline:
        print("the true next token inline (accuracy % and mean log p, standard errors in brackets): plain, after an "
              "empty thought, after the true token written in the thought (oracle), after the model's own thoughts")
        print(inline_table(inline))
    print(f"context (both modes): mean {context['tokens_mean']:.0f}, max {context['tokens_max']} tokens (stored mean "
          f"{context['stored_tokens_mean']:.0f}; {100 * context['cut_frac']:.0f}% cut to data.max_prompt_tokens = "
          f"{cfg.data.max_prompt_tokens} with template {cfg.data.template!r})")
    if e.reasoning:
        print(f"reasoning: response_len {stats['response_len']:.1f}, truncated_frac {stats['truncated_frac']:.3f} "
              f"(cut by rollout.max_tokens = {cfg.rollout.max_tokens}; a cut completion earns 0), answer_rate "
              f"{stats['answer_rate']:.3f} (completions that "
              f"{'close their thought' if build.inline else 'box an answer after </think>'})"
              + (f", thought_tokens {stats['thought_tokens']:.1f}" if "thought_tokens" in stats else ""))
    print(f"entropy: {result['entropy']} -> {path}")
    return result
