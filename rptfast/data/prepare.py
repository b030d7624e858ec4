"""`rptfast prepare`: raw text -> proxy-filtered RPT samples in Parquet shards.

    rptfast prepare --corpus a.jsonl b.parquet dir/ --proxy MODEL --out DIR \
        [--tokenizer POLICY] [--config PRESET] [--set prepare.min_entropy=1.0 ...]

Documents stream from the corpus (rptfast.data.corpus), are tokenized with the policy's
tokenizer, go through the proxy in packed batches of about prepare.proxy_batch_tokens
tokens (rptfast.data.filter), and the positions that pass the filter become samples
(rptfast.data.store: schema, shards, resume).

The policy's tokenizer is --tokenizer, else model.path of the config, else the proxy's own.
A proxy whose tokenizer cuts text differently from the policy's (another normalizer,
pre-tokenizer, vocabulary or merges) is refused, not re-tokenized: its entropies would be of
other units than the tokens the policy is asked to predict. Pick a proxy of the policy's
family (Qwen3-0.6B for Qwen3, R1-Distill-Qwen-1.5B for R1-Distill-Qwen-14B).

The proxy loads with model.dtype, model.attn and model.trust_remote_code, on the GPU when
there is one. Batches are formed greedily from whole documents in corpus order and shards
close only between batches, so a resumed run forms the same batches as an uninterrupted one
and writes the same bytes. Ctrl-C stops with "interrupted; rerun the same command to resume"
(exit 130); the shards written so far are whole, and the rerun goes on from the last one.

Held-out documents are chosen across the corpus, not one by one: the documents are counted
first (rptfast.data.corpus.count_documents, no decoding), and round(prepare.eval_fraction x
count) of them, at least one when the fraction is above 0 and at most all but one, are drawn
seeded by prepare.seed. So a corpus of 7 documents still gives a held-out set. A held-out
document that is then skipped (empty, too short) gives no samples; the manifest counts them.

Nothing kept is an error, not an empty store: when the whole corpus gives no sample (every
document skipped: not UTF-8, JSONL lines that are not objects with the text field, empty; or
every position dropped: too little context, low entropy, non-finite proxy logits), prepare
prints the counts on one line, writes no manifest, and raises NothingKeptError (exit 2) naming
the stage that dropped everything and the fix. The counts line ends every prepare.

Throughput: the progress bar counts documents against the total (with an ETA) and shows
tokens/s; the manifest records it (this_run). On the CPU the proxy's packed batches run
through per-sequence attention (model.attn = auto -> per_seq: no dense [T, T] mask), so a
bigger prepare.proxy_batch_tokens is no slower there: measured 2026-11-23 with the 2-layer
test model on 12 documents of 3.9k tokens, 2 cores under heavy shared load, 2048 gave 298
and 315 tokens/s, the default 8192 gave 334 and 526. Keep the default; it is sized for GPUs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from rptfast.config import Config
from rptfast.data.corpus import CorpusError, Document, count_documents, documents, open_sources
from rptfast.data.filter import POSITION_FATES, Proxy, select
from rptfast.data.store import COLUMNS, FORMAT, SCHEMA, ShardWriter, shard_name, write_json
from rptfast.data.tokens import fingerprint, raw_text_encoder, token_bytes
from rptfast.errors import PathError, check_writable_dir
from rptfast.model import resolve_dtype
from rptfast.rollout import check_model_dir, is_hub_name

MAX_SKIP_EXAMPLES = 20  # skipped documents listed by id in the manifest
SKIP_REASONS = {
    "empty_file": "a file with no records",
    "invalid_utf8": "bytes that are not UTF-8",
    "bad_json": "a JSONL line that is not a JSON object",
    "missing_field": "a JSONL record without prepare.text_field",
    "not_text": "a text value that is null or not a string",
    "empty": "an empty or whitespace-only document",
    "changed_by_tokenizer": "the tokenizer's normalizer changes the text (its tokens do not spell it back)",
    "too_short": "fewer than prepare.min_context_tokens + 1 tokens: no position has enough context",
}
SKIP_FIXES = {  # what to do when every document was skipped for this reason
    "empty_file": "give files that hold text",
    "invalid_utf8": "convert the files to UTF-8 (e.g. iconv -t UTF-8)",
    "bad_json": "write one JSON object per line",
    "missing_field": "put each document's text under prepare.text_field",
    "not_text": "make prepare.text_field (or the column) a string in every record",
    "empty": "give documents that hold text",
    "changed_by_tokenizer": "use a tokenizer whose normalizer keeps the text as it is",
    "too_short": "give longer documents or lower prepare.min_context_tokens",
}


class NothingKeptError(CorpusError):
    """prepare read the whole corpus and kept no sample: the message says why (the counts) and the fix."""


def load_tokenizer(path: str, trust_remote_code: bool, key: str = "the tokenizer"):
    """The tokenizer at a local directory or hub name; `key` names where the path came from in errors."""
    from transformers import AutoTokenizer

    if "/" in path and not is_hub_name(path) and not Path(path).exists():  # a path, and none there
        raise PathError(f"{key} {path!r} does not exist; give a directory with a tokenizer, or a hub name (org/name)")
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # ValueError: HFValidationError for a path that is no repo id either
        raise PathError(f"{key} {path!r}: cannot load a tokenizer there: {e}") from None


def heldout_documents(n_docs: int, fraction: float, seed: int) -> set[int]:
    """Ordinals of the held-out documents: round(fraction x n_docs), at least 1 if fraction > 0, never all."""
    if fraction <= 0 or n_docs < 2:
        return set()
    k = min(max(1, round(fraction * n_docs)), n_docs - 1)
    return {int(i) for i in np.random.default_rng([seed, n_docs]).permutation(n_docs)[:k]}


def differences(old: dict, new: dict) -> str:
    """What differs between the inputs a store was made with and this command's: names the settings."""
    parts = []
    a, b = old.get("settings") or {}, new["settings"]
    parts += [f"prepare.{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    ca, cb = {c["path"]: c for c in old.get("corpus") or []}, {c["path"]: c for c in new["corpus"]}
    parts += [f"corpus path {x!r} removed" for x in ca if x not in cb]
    parts += [f"corpus path {x!r} added" for x in cb if x not in ca]
    parts += [f"corpus {x!r} changed ({ca[x]['bytes']} -> {cb[x]['bytes']} bytes)" for x in cb
              if x in ca and ca[x] != cb[x]]
    for key, name in (("proxy", "--proxy"), ("tokenizer_sha256", "the policy tokenizer"),
                      ("proxy_dtype", "model.dtype of the proxy")):
        if old.get(key) != new[key]:
            parts.append(f"{name} {old.get(key)!r} -> {new[key]!r}")
    return "; ".join(parts) or "inputs not recorded (made by an older rptfast)"


def prepare(cfg: Config, corpus: list[str], proxy: str, out: str, tokenizer: str | None = None,
            progress: bool | None = None) -> dict:
    """Write (or finish) the sample store in `out` and return its manifest.

    Ctrl-C: prints how to resume and raises SystemExit(130) (the CLI exits 130, no traceback).
    Whatever stops it, a directory it created and left empty (no shard written yet) is removed.
    """
    existed = Path(out).exists()
    try:
        return _prepare(cfg, corpus, proxy, out, tokenizer, progress)
    except KeyboardInterrupt:
        print(f"\nprepare: interrupted; rerun the same command to resume (shards written so far in {out} are "
              f"kept)", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if not existed and Path(out).is_dir() and not any(Path(out).iterdir()):
            Path(out).rmdir()


def _prepare(cfg: Config, corpus: list[str], proxy: str, out: str, tokenizer: str | None,
             progress: bool | None) -> dict:
    p = cfg.prepare
    if Path(out).exists() and not Path(out).is_dir():
        raise PathError(f"--out {out!r} is a file; give a directory for the sample store")
    check_writable_dir(out, "--out")
    check_model_dir(proxy, key="--proxy")
    sources = open_sources(corpus, p)
    tok_path = tokenizer or cfg.model.path or proxy
    key = "--tokenizer" if tokenizer else "model.path (the policy's tokenizer)" if cfg.model.path else "--proxy"
    policy_tok = load_tokenizer(tok_path, cfg.model.trust_remote_code, key)
    fp = fingerprint(policy_tok)
    if tok_path != proxy and fingerprint(load_tokenizer(proxy, cfg.model.trust_remote_code, "--proxy")) != fp:
        raise CorpusError(f"the proxy {proxy!r} tokenizes text differently from the policy tokenizer {tok_path!r}; "
                          f"entropies would be of other tokens than the ones the policy predicts. Use a proxy of "
                          f"the policy's family, or pass --tokenizer for the policy's own tokenizer")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(cfg.model.dtype, device)
    corpus_info = [{"path": s.path, "format": s.format, "bytes": sum(f.stat().st_size for f in s.files)}
                   for s in sources]
    key = hashlib.sha256(json.dumps([dataclasses.asdict(p), corpus_info, proxy, fp, str(dtype)], sort_keys=True)
                         .encode()).hexdigest()
    inputs = {"settings": dataclasses.asdict(p), "corpus": corpus_info, "proxy": proxy, "tokenizer_sha256": fp,
              "proxy_dtype": str(dtype).removeprefix("torch.")}
    manifest_path = Path(out) / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("key") != key:
            raise CorpusError(f"{out} already holds a finished sample store made with other settings: "
                              f"{differences(manifest, inputs)}; choose another --out or delete it")
        print(f"prepare: {out} is already complete ({manifest['counts']['samples']['total']} samples)")
        return manifest
    writer = ShardWriter(Path(out), key)
    state = writer.resume(lambda old: differences(old.get("inputs") or {}, inputs)) or {
        "key": key, "inputs": inputs, "docs_done": 0, "counts": {}, "skipped_examples": [], "shards": []}
    n_docs = count_documents(sources, p)
    heldout = heldout_documents(n_docs, p.eval_fraction, p.seed)
    lm = Proxy(proxy, dtype=dtype, attn=cfg.model.attn, device=device, trust_remote_code=cfg.model.trust_remote_code,
               top_k=p.top_k, batch_tokens=p.proxy_batch_tokens, window=p.proxy_window)
    run = _Run(p, policy_tok, lm, writer, state, heldout)
    if len(run.tb) > lm.vocab:
        raise CorpusError(f"the policy tokenizer has {len(run.tb)} tokens but the proxy {proxy!r} only {lm.vocab} "
                          f"output rows; use a proxy of the policy's family")
    if state["docs_done"]:
        print(f"prepare: resuming {out} after {len(state['shards'])} shards ({state['docs_done']} documents done)")
    show = progress if progress is not None else cfg.log.progress and sys.stderr.isatty()
    seconds, tokens = run(sources, show, n_docs)
    counts = _nested(run.counts)
    if counts["samples"]["total"] == 0:  # no shard was written: the store would be an empty, unusable directory
        print(f"prepare: {summary(counts)}")
        raise NothingKeptError(why_nothing_kept(counts, corpus, proxy, p))
    manifest = {
        "format": FORMAT,
        "key": key,
        "corpus": corpus_info,
        "proxy": proxy,
        "proxy_dtype": str(dtype).removeprefix("torch."),
        "tokenizer": tok_path,
        "tokenizer_sha256": fp,
        "settings": dataclasses.asdict(p),
        "counts": counts,
        "heldout_documents": sorted(heldout),
        "skipped": {reason: {"documents": run.counts[f"documents/skipped/{reason}"], "why": why}
                    for reason, why in SKIP_REASONS.items() if run.counts[f"documents/skipped/{reason}"]},
        "skipped_examples": state["skipped_examples"],
        "shards": state["shards"],
        "columns": COLUMNS,
        "this_run": {"seconds": round(seconds, 3), "tokens": tokens,
                     "tokens_per_s": round(tokens / seconds, 1) if seconds else 0.0,
                     "resumed_after_documents": run.resumed_at, "device": str(device)},
    }
    write_json(manifest_path, manifest)
    print(f"prepare: {summary(counts)} in {len(state['shards'])} shards; "
          f"{manifest['this_run']['tokens_per_s']:.0f} tokens/s -> {out}")
    return manifest


def _pairs(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items() if v)


def summary(c: dict) -> str:
    """One line of the manifest's counts: documents and why they were skipped, positions and why they were dropped."""
    d, pos, s = c["documents"], c["positions"], c["samples"]
    skipped = sum(d["skipped"].values())
    dropped = {k: pos[k] for k in POSITION_FATES if k != "kept"}
    return (f"{d['read']} documents ({skipped} skipped{': ' + _pairs(d['skipped']) if skipped else ''}), "
            f"{c['tokens']} tokens, {pos['scored']} positions scored ({pos['scored'] - pos['kept']} dropped"
            f"{': ' + _pairs(dropped) if pos['scored'] > pos['kept'] else ''}), {s['total']} samples "
            f"({s['eval']} held out)")


def why_nothing_kept(c: dict, corpus: list[str], proxy: str, p) -> str:
    """The error of a prepare that kept no sample: which stage dropped everything, the counts, and the fix."""
    d, pos = c["documents"], c["positions"]
    where = f"--corpus {' '.join(corpus[:3])}{' ...' if len(corpus) > 3 else ''}"
    if d["with_samples"] + d["without_samples"] == 0:
        reasons = {k: v for k, v in d["skipped"].items() if v}
        fixes = "; ".join(SKIP_FIXES[k] for k in reasons)
        return (f"no sample kept: all {d['read']} documents of {where} were skipped ("
                + ", ".join(f"{k} {v}: {SKIP_REASONS[k]}" for k, v in reasons.items()) + f"); {fixes}")
    if pos["non_finite"]:
        return (f"no sample kept: --proxy {proxy!r} gave non-finite logits at {pos['non_finite']} of the "
                f"{pos['scored']} positions, and no other position passed ({_pairs(pos)}); its activations "
                f"overflow or its weights are damaged: try --set model.dtype=float32, or use another proxy")
    return (f"no sample kept: none of the {pos['scored']} positions of the {d['read']} documents of {where} passed "
            f"the filter ({_pairs({k: pos[k] for k in POSITION_FATES})}); lower prepare.min_entropy (now "
            f"{p.min_entropy}) or prepare.min_context_tokens (now {p.min_context_tokens}), or give more text")


class _Run:
    """One pass over the corpus from the saved state: documents -> batches -> samples -> shards."""

    def __init__(self, p, policy_tok, lm: Proxy, writer: ShardWriter, state: dict, heldout: set[int]):
        self.p, self.lm, self.writer, self.state, self.heldout = p, lm, writer, state, heldout
        self.tb = token_bytes(policy_tok)
        self.tb_len = np.array([len(b) for b in self.tb], dtype=np.int64)  # [V]
        self.encoder = raw_text_encoder(policy_tok)
        self.counts = Counter(state["counts"])
        self.resumed_at = state["docs_done"]
        self.rows: dict[str, list] = {name: [] for name in SCHEMA.names}
        self.t0, self.tokens_run = time.perf_counter(), 0  # for the progress bar's tokens/s

    def __call__(self, sources, show: bool, n_docs: int) -> tuple[float, int]:
        """Process every remaining document; return (seconds, tokens) of this run."""
        from tqdm import tqdm

        p = self.p
        t0, tokens = time.perf_counter(), 0
        pending: list[tuple[Document, list[int] | None]] = []  # whole documents of the next proxy batch
        pending_tokens = 0
        with tqdm(desc="prepare", total=n_docs, initial=self.resumed_at, unit="doc", disable=not show,
                  dynamic_ncols=True) as bar:
            self.t0 = t0
            for doc in documents(sources, p, start=self.resumed_at):
                ids = self.tokenize(doc)
                if ids is not None and pending_tokens and pending_tokens + len(ids) > p.proxy_batch_tokens:
                    tokens += self.batch(pending, bar)
                    pending, pending_tokens = [], 0
                pending.append((doc, ids))
                pending_tokens += len(ids) if ids is not None else 0
                if pending_tokens >= p.proxy_batch_tokens:
                    tokens += self.batch(pending, bar)
                    pending, pending_tokens = [], 0
            if pending:
                tokens += self.batch(pending, bar)
        if self.rows["position"]:
            self.flush()
        return time.perf_counter() - t0, tokens

    def tokenize(self, doc: Document) -> list[int] | None:
        """Token ids, or None with doc.skip set."""
        if doc.skip is not None:
            return None
        ids = self.encoder.encode(doc.text, add_special_tokens=False).ids
        if b"".join(self.tb[i] for i in ids) != doc.text.encode("utf-8"):
            doc.skip = "changed_by_tokenizer"
            return None
        if len(ids) <= self.p.min_context_tokens:
            doc.skip = "too_short"
            return None
        return ids

    def batch(self, pending: list[tuple[Document, list[int] | None]], bar) -> int:
        """Proxy entropies for the batch's documents, their samples, a shard if enough; return its tokens."""
        docs = [ids for _, ids in pending if ids is not None]
        entropies = iter(self.lm.entropies(docs))
        for doc, ids in pending:
            self.counts["documents/read"] += 1
            if ids is None:
                self.counts[f"documents/skipped/{doc.skip}"] += 1
                if len(self.state["skipped_examples"]) < MAX_SKIP_EXAMPLES:
                    self.state["skipped_examples"].append({"doc_id": doc.doc_id, "reason": doc.skip})
                continue
            data = doc.text.encode("utf-8")
            offsets = np.concatenate([[0], np.cumsum(self.tb_len[ids])])  # [n + 1]
            samples, fates = select(doc.index, ids, data, offsets, next(entropies), self.p)
            self.counts["positions/scored"] += len(ids) - 1
            for fate, n in fates.items():
                self.counts[f"positions/{fate}"] += n
            self.counts["documents/with_samples" if samples else "documents/without_samples"] += 1
            split = "eval" if doc.index in self.heldout else "train"
            self.counts[f"samples/{split}"] += len(samples)
            for s in samples:
                _append(self.rows, doc, split, s, data, offsets)
        n_tokens = sum(len(ids) for ids in docs)
        self.counts["tokens"] += n_tokens
        self.state["docs_done"] += len(pending)
        self.tokens_run += n_tokens
        bar.update(len(pending))
        bar.set_postfix(tok_s=f"{self.tokens_run / max(time.perf_counter() - self.t0, 1e-9):.0f}",
                        samples=self.counts["samples/train"] + self.counts["samples/eval"])
        if len(self.rows["position"]) >= self.p.shard_samples:
            self.flush()
        return n_tokens

    def flush(self) -> None:
        """The buffered samples as the next shard, with the state after the last whole batch."""
        n = len(self.rows["position"])
        n_eval = sum(s == "eval" for s in self.rows["split"])
        self.state["shards"].append({"file": shard_name(len(self.state["shards"])), "rows": n, "train": n - n_eval,
                                     "eval": n_eval})
        self.state["counts"] = dict(self.counts)
        self.writer.write(self.rows, self.state)
        for col in self.rows.values():
            col.clear()


def _append(rows: dict[str, list], doc: Document, split: str, s, data: bytes, offsets: np.ndarray) -> None:
    start = int(offsets[s.context_start])
    g = data[s.byte_offset:s.byte_offset + s.boundaries[-1]]
    values = dict(doc_id=doc.doc_id, doc_index=doc.index, split=split, position=s.position,
                  byte_offset=s.byte_offset, context=data[start:s.byte_offset].decode("utf-8"),
                  context_ids=s.context_ids, continuation=g.decode("utf-8"), continuation_bytes=g,
                  continuation_ids=s.continuation_ids, boundaries=s.boundaries, entropy=s.entropy)
    for name, value in values.items():
        rows[name].append(value)


def _nested(counts: Counter) -> dict:
    """Flat "documents/skipped/empty" counters -> the manifest's nested counts (zeros included)."""
    docs = {"read": counts["documents/read"], "with_samples": counts["documents/with_samples"],
            "without_samples": counts["documents/without_samples"],
            "skipped": {r: counts[f"documents/skipped/{r}"] for r in SKIP_REASONS}}
    positions = {"scored": counts["positions/scored"], **{f: counts[f"positions/{f}"] for f in POSITION_FATES}}
    samples = {"train": counts["samples/train"], "eval": counts["samples/eval"]}
    samples["total"] = samples["train"] + samples["eval"]
    return {"documents": docs, "positions": positions, "samples": samples, "tokens": counts["tokens"]}
