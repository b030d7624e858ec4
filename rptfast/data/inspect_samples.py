"""`rptfast inspect`: look at a sample store before spending GPU hours on it.

    rptfast inspect --data DIR [--samples 3] [--split all|train|eval] [--template v0] [--tokenizer PATH]
                    [--config C] [--set data.max_prompt_tokens=2048 ...]

For each sample (drawn across documents, seeded by --seed, as `rptfast eval` draws them): its
split, document, position and proxy entropy (with the paper's difficulty splits it falls in),
the tail of its context, the ground-truth continuation cut into its tokens with the valid
answer ends marked, the answer that earns 1 for the first token written the way the
templates ask (rptfast.reward.escape), and the prompt the policy gets: the context in the
chosen template, chat-wrapped and cut to data.max_prompt_tokens, with its token count.

The tokenizer is the one the store was made with (its manifest), or --tokenizer (a policy of
the same tokenizer family: it must cut text the same way). Nothing is written.
"""

from __future__ import annotations

from rptfast.config import Config
from rptfast.data.store import SPLITS, SampleStore, check_tokenizer
from rptfast.data.templates import PromptBuilder
from rptfast.data.tokens import token_bytes
from rptfast.reward import escape

RULE = "-" * 100


def show_token(b: bytes) -> str:
    """A token's text as a Python literal; raw bytes when it holds part of a character."""
    try:
        return repr(b.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(b)


def inspect_store(cfg: Config, data: str, samples: int, split: str, template: str | None, tokenizer: str | None,
                  seed: int, context_chars: int) -> list[dict]:
    """Print `samples` samples of the store `data`; return what was printed, as dicts (tests)."""
    from rptfast.data.prepare import load_tokenizer

    store = SampleStore(data)
    tok_path = tokenizer or store.manifest["tokenizer"]
    tok = load_tokenizer(tok_path, cfg.model.trust_remote_code)
    check_tokenizer(store, tok, f"tokenizer {tok_path!r}")
    name = template or cfg.data.template
    tb = token_bytes(tok)
    build = PromptBuilder.of(tok, cfg.data, name, tb)
    rows = store.spread(store.rows(split), samples, seed)
    c = store.manifest["counts"]["samples"]
    print(f"{data}: {c['total']} samples ({c['train']} train, {c['eval']} eval) from "
          f"{store.manifest['counts']['documents']['with_samples']} documents; tokenizer {tok_path!r}; "
          f"showing {len(rows)} of split {split!r}")
    shown = []
    for row in rows:
        s = store.get(int(row))
        levels = [k for k, low in SPLITS.items() if low is not None and s["entropy"] > low]
        context = s["context"]
        tail = context[-context_chars:]
        tokens = [tb[i] for i in s["continuation_ids"]]
        ends, at = [], 0
        for b in tokens:
            at += len(b)
            ends.append(at in s["boundaries"])
        truth = " | ".join(show_token(b) + ("" if ok else " (ends mid-character)") for b, ok in zip(tokens, ends))
        first = s["continuation_bytes"][:s["boundaries"][0]].decode("utf-8")
        kept = build.context(s["context_ids"])
        prompt = build.pre + kept + build.post
        text = tok.decode(prompt, skip_special_tokens=False)
        print(RULE)
        print(f"sample row {int(row)} | split {s['split']} | doc {s['doc_id']} | position {s['position']} | "
              f"entropy {s['entropy']:.3f} nats ({', '.join(levels) or 'below easy'})")
        print(f"context, last {len(tail)} of {len(context)} characters ({len(s['context_ids'])} tokens stored):")
        print(("..." if len(tail) < len(context) else "") + tail)
        print(f"ground truth, token by token (an answer may stop after any token not marked): {truth}")
        print(f"an answer that earns 1 (the first token): \\boxed{{{escape(first)}}}")
        print(f"prompt: template {name!r}, {len(prompt)} tokens (data.max_prompt_tokens = "
              f"{cfg.data.max_prompt_tokens}); context {len(kept)} of {len(s['context_ids'])} tokens kept")
        print(text)
        shown.append({"row": int(row), "split": s["split"], "entropy": s["entropy"], "tokens": tokens,
                      "answer": escape(first), "prompt_tokens": len(prompt), "context_kept": len(kept)})
    return shown
