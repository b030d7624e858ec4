"""Quiet-STaR's mixing head beside (or instead of) the transparent-thought warm-up, on a real model (docs/rpt.md).

    .venv/bin/python bench/mixing_head.py --model runs/real/smollm2 --data runs/real/samples [--steps 120]
        [--hint 0.3] [--lr 1e-4] [--head-only] [--seed 0]

Quiet-STaR (arXiv 2403.09629) makes a thought cost nothing at the start with a mixing head: a small MLP on the
hidden states after the thought and without it gives a weight w in (0, 1), and the prediction after a thought is
w * logits(after the thought) + (1 - w) * logits(no thought). Its bias starts at -4 (w ~ 0.02), so at step 0 the
prediction is the model's own without the thought. This script trains it on the same sequences as rptfast's
warm-up (data.rpt_ntp = "thoughts": the store's contexts with thoughts inserted, empty or holding the next 1-3 true
tokens; RPTTask.pretrain_samples, with the preset rpt-smollm2-135m's spans, 8 windows a step, its learning rate),
the loss on the text only, the head applied at each text token right after a close; with --head-only the model
stays frozen (the head as the alternative to a warm-up), else both train (the head beside it). Each step runs two
forwards: the sequences with their thoughts, and the same text without; matmuls in bf16 (autocast) over fp32
weights, as the trainer's warm-up computes. The warm-up's third kind of thought, the model's own sampled one,
needs the engine and is left out here (data.thought_sampled = 0: those spans are empty).

It then scores the held-out samples as `rptfast eval` does (the same contexts and markers), plain, after an empty
thought and after the true token written in the thought (oracle), each with the head (mixed) and without it (the
model's own prediction after the thought, which is what the engine samples from and RL trains): accuracy and mean
log p of the true next token with standard errors. One JSON line per run is appended to
bench/results/mixing_head.jsonl.

Left out: Quiet-STaR's dedicated thought tokens (start/end tokens learned from the em dash's embedding): they add
rows to the vocabulary, which every engine and checkpoint would then have to carry; the markers here are the same
text as the warm-up's and the RL prompts'. Also left out: REINFORCE on the thoughts (that is RL's part, run by
the trainer) and the extended teacher forcing (one true token after the thought, as RLP scores it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rptfast import config
from rptfast.data.prepare import load_tokenizer
from rptfast.data.store import SampleStore, split_masks
from rptfast.errors import appending, run_script
from rptfast.eval import inline_sequences
from rptfast.model import Sequence, collate, hidden_states, load_policy, resolve_attn
from rptfast.provenance import stamp
from rptfast.tasks.rpt import RPTTask

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "mixing_head.jsonl"


class MixingHead(nn.Module):
    """w = sigmoid(MLP([h_thought, h_plain])): [N, 2H] -> [N]; starts near 0 (the thought ignored)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.constant_(self.mlp[2].bias, -4.0)

    def forward(self, h_thought: torch.Tensor, h_plain: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.mlp(torch.cat([h_thought, h_plain], -1))[:, 0])


def after_close(s: Sequence) -> tuple[list[int], list[int]]:
    """Of a warm-up sequence: its text (the tokens that are not thoughts), and for each scored token its text index
    and whether it follows a close."""
    skip = set(s.skip)
    text_index, n = {}, 0
    for j in range(len(s.tokens)):
        if j not in skip:
            text_index[j] = n
            n += 1
    return [text_index[j] for j in s.scored], [j - 1 in skip for j in s.scored]


def mixed_logits(lm, head, think_h, plain_h, mix):
    """Logits [N, V]: after a thought (rows where mix) w * thought + (1 - w) * plain, elsewhere the thought's."""
    w_out = lm.get_output_embeddings().weight
    logits = think_h @ w_out.T
    if mix.any():
        w = head(think_h[mix], plain_h[mix])
        logits[mix] = w[:, None] * logits[mix] + (1 - w[:, None]) * (plain_h[mix] @ w_out.T)
    return logits


def train(lm, head, task, steps: int, per_step: int, head_only: bool, lr: float) -> list[float]:
    device = torch.device("cpu")
    params = [{"params": head.parameters(), "lr": 1e-3}]
    if head_only:
        lm.requires_grad_(False)  # no backward through the model: the head learns on its hidden states alone
    else:
        params.append({"params": lm.parameters(), "lr": lr})
    opt = torch.optim.AdamW(params, weight_decay=0.0)
    losses = []
    for step in range(steps):
        seqs = task.pretrain_samples(step * per_step, per_step)
        plain = [Sequence([t for j, t in enumerate(s.tokens) if j not in skip], 1)
                 for s in seqs for skip in [set(s.skip)]]
        mb, mb_plain = collate(seqs, list(range(len(seqs))), device), collate(plain, list(range(len(plain))), device)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = hidden_states(lm, mb).index_select(0, mb.pred_idx).float()  # [R, H], one row per scored text token
            hp_all = hidden_states(lm, mb_plain).float()  # [T', H]
        rows, mix, offset = [], [], 0
        for s, p in zip(seqs, plain):
            idx, after = after_close(s)
            rows += [offset + i - 1 for i in idx]  # the plain row predicting text token i
            mix += after
            offset += len(p.tokens)
        hp = hp_all.index_select(0, torch.tensor(rows))
        logits = mixed_logits(lm, head, h, hp, torch.tensor(mix))
        loss = nn.functional.cross_entropy(logits.float(), mb.targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in params for p in g["params"]], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        print(f"step {step + 1:3d} | loss {loss.item():.4f}", flush=True)
    return losses


@torch.no_grad()
def evaluate(lm, head, task, samples, entropy) -> dict:
    """Per mode (plain, empty, oracle) and split: accuracy and log p, with the head (mixed) and without."""
    build, device = task.build, torch.device("cpu")
    contexts = [build.context(s["context_ids"]) for s in samples]
    truths = [s["continuation_ids"][0] for s in samples]
    w_out = lm.get_output_embeddings().weight

    def last_hidden(thoughts):
        seqs = inline_sequences(build, contexts, truths, thoughts)
        out = []
        for at in range(0, len(seqs), 32):
            mb = collate(seqs, list(range(at, min(at + 32, len(seqs)))), device)
            out.append(hidden_states(lm, mb).index_select(0, mb.pred_idx))
        return torch.cat(out)  # [N, H]

    plain_h = last_hidden([None] * len(samples))
    target = torch.tensor(truths)
    out = {}
    for mode, thoughts in (("plain", None), ("empty", [[]] * len(samples)), ("oracle", [[t] for t in truths])):
        h = plain_h if thoughts is None else last_hidden(thoughts)
        variants = {"own": h @ w_out.T}
        if thoughts is not None:
            w = head(h, plain_h)
            variants["mixed"] = w[:, None] * variants["own"] + (1 - w[:, None]) * (plain_h @ w_out.T)
            out[f"{mode}/w_mean"] = float(w.mean())
        for name, logits in variants.items():
            logp = logits.float().log_softmax(-1).gather(1, target[:, None])[:, 0].double().numpy()
            right = (logits.argmax(-1) == target).double().numpy()
            for split, mask in split_masks(entropy).items():
                n = int(mask.sum())
                out[f"{mode}/{name}/{split}"] = {
                    "accuracy": float(right[mask].mean()), "accuracy_se": float(right[mask].std(ddof=1) / np.sqrt(n)),
                    "logp": float(logp[mask].mean()), "logp_se": float(logp[mask].std(ddof=1) / np.sqrt(n))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="runs/real/smollm2")
    ap.add_argument("--data", default="runs/real/samples")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--per-step", type=int, default=8)
    ap.add_argument("--hint", type=float, default=0.3)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--head-only", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    cfg = config.load("rpt-smollm2-135m", [f"data.samples={args.data}", "data.template=inline",
                                           "data.max_prompt_tokens=100", "data.rpt_ntp=thoughts",
                                           f"data.thought_hint={args.hint}", "data.thought_sampled=0"])
    tok = load_tokenizer(args.model, False)
    task = RPTTask(tok, cfg.data, cfg.rollout, seed=args.seed)
    lm = load_policy(args.model, dtype=torch.float32, attn=resolve_attn("auto", torch.device("cpu"), torch.float32),
                     trust_remote_code=False, gradient_checkpointing=False)
    head = MixingHead(lm.config.hidden_size)
    store = SampleStore(args.data)
    rows = store.rows("eval")
    samples = [store.get(int(r)) for r in rows]
    t0 = time.time()
    lm.train()
    losses = train(lm, head, task, args.steps, args.per_step, args.head_only, args.lr)
    lm.eval()
    result = {"steps": args.steps, "per_step": args.per_step, "hint": args.hint, "lr": args.lr,
              "head_only": args.head_only,
              "seed": args.seed, "loss_first": losses[0] if losses else None,
              "loss_last": losses[-1] if losses else None,
              "train_seconds": round(time.time() - t0, 1), "samples": len(samples),
              **evaluate(lm, head, task, samples, store.entropy[rows]), **stamp()}
    for mode in ("plain", "empty", "oracle"):
        for name in ("own", "mixed"):
            cell = result.get(f"{mode}/{name}/all")
            if cell:
                print(f"{mode:7s} {name:6s} accuracy {100 * cell['accuracy']:5.1f} ({100 * cell['accuracy_se']:.1f}) "
                      f"log p {cell['logp']:6.2f} ({cell['logp_se']:.2f})")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with appending(RESULTS), RESULTS.open("a", buffering=1) as f:  # a full disk: one line, exit 2, no torn row
        f.write(json.dumps(result) + "\n")
    print(json.dumps({k: v for k, v in result.items() if "/" not in k}))


if __name__ == "__main__":
    sys.exit(run_script(main))
