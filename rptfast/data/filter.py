"""Proxy-entropy filtering: which positions of a document become RPT samples.

A small proxy model reads each document once (packed with others, no padding) and gives, at
every position t >= 1, the entropy of its renormalised top-k next-token distribution
(`topk_entropy`, k = prepare.top_k = 16 as in the paper). A position t (predict token t from
tokens < t) is kept when
  1. t >= prepare.min_context_tokens,
  2. token t starts and ends between two characters (a byte-level token may hold half of a
     multi-byte character; a prediction written as text could never end there),
  3. its entropy is finite and >= prepare.min_entropy,
  4. it is among at most prepare.max_positions_per_doc positions drawn, seeded by
     (prepare.seed, document ordinal), from those that pass 1-3.
Every scored position lands in exactly one of: short_context, mid_character, non_finite,
low_entropy, over_cap, kept, which the manifest counts. A non-finite entropy means non-finite
proxy logits (NaN or inf in the top k: overflow, or damaged weights); it is counted apart from
low_entropy so that a broken proxy is named as such. The proxy's weights are checked for
non-finite values when it loads, and a batch whose every scored position is non-finite stops
prepare at once (NonFiniteProxyError, exit 2): a proxy that overflows on everything would
otherwise read the whole corpus to keep nothing.

Documents longer than prepare.proxy_window tokens run in windows that overlap by half: a
window starting at s scores the positions of its second half, so every position past the
first window is scored with between window/2 and window tokens of context (the first
window's positions see the whole document before them).

Left out: logit soft-capping or scaling that some architectures apply after lm_head
(Gemma, Cohere); Qwen, Llama and DeepSeek apply none. Logits are in the proxy's dtype
(bf16 on CUDA, fp32 on the CPU); the entropy is fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rptfast.data.tokens import char_starts
from rptfast.errors import FileFormatError
from rptfast.kernels import topk_entropy
from rptfast.model import Sequence, collate, hidden_states, load_policy, resolve_attn

LOGIT_ELEMENTS = 1 << 27  # logits materialised at once: rows x vocab (256 MiB in bf16)
POSITION_FATES = ("short_context", "mid_character", "non_finite", "low_entropy", "over_cap", "kept")


class NonFiniteProxyError(FileFormatError):
    """The proxy gives non-finite numbers (its weights, or its logits on every position of a batch)."""


def windows(n: int, window: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored offset) of the proxy sequences covering a document of n tokens."""
    if n <= window:
        return [(0, n, 1)]
    half = window // 2
    out = [(0, window, 1)]
    s = window - half
    while s + half < n:
        out.append((s, min(s + 2 * half, n), half))
        s += half
    return out


class Proxy:
    """The proxy model on one device: top-k entropy at every position of packed documents."""

    def __init__(self, path: str, *, dtype: torch.dtype, attn: str, device: torch.device, trust_remote_code: bool,
                 top_k: int, batch_tokens: int, window: int):
        self.lm = load_policy(path, dtype=dtype, attn=resolve_attn(attn, device, dtype),
                              trust_remote_code=trust_remote_code, gradient_checkpointing=False).to(device).eval()
        self.path, self.dtype = path, dtype
        self.device, self.top_k, self.batch_tokens, self.window = device, top_k, batch_tokens, window
        self.vocab = self.lm.get_output_embeddings().weight.shape[0]
        bad = [name for name, t in self.lm.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
        if bad:
            raise NonFiniteProxyError(f"--proxy {path!r} has non-finite values (NaN or inf) in {len(bad)} weight "
                                      f"tensors ({', '.join(bad[:3])}); its weights are damaged: use another proxy")

    @torch.no_grad()
    def entropies(self, docs: list[list[int]]) -> list[np.ndarray]:
        """Per document of n tokens: fp32 [n], entry t the entropy before token t (entry 0 is NaN)."""
        out = [np.full(len(ids), np.nan, dtype=np.float32) for ids in docs]
        pieces = [(d, s, e, first) for d, ids in enumerate(docs) for s, e, first in windows(len(ids), self.window)]
        batch: list[tuple[int, int, int, int]] = []
        used = 0
        for piece in pieces + [None]:
            if piece is None or (batch and used + piece[2] - piece[1] > self.batch_tokens):
                self._run(docs, batch, out)
                batch, used = [], 0
            if piece is not None:
                batch.append(piece)
                used += piece[2] - piece[1]
        return out

    def _run(self, docs: list[list[int]], batch: list[tuple[int, int, int, int]], out: list[np.ndarray]) -> None:
        if not batch:
            return
        seqs = [Sequence(docs[d][s:e], first) for d, s, e, first in batch]
        mb = collate(seqs, list(range(len(seqs))), self.device)
        h = hidden_states(self.lm, mb).index_select(0, mb.pred_idx)  # [R, H]: the state before each scored token
        head = self.lm.get_output_embeddings()
        rows = max(1, LOGIT_ELEMENTS // self.vocab)
        ent = torch.cat([topk_entropy(head(h[i:i + rows]), self.top_k)  # [r, V] -> [r]
                         for i in range(0, h.shape[0], rows)]).cpu().numpy()  # [R]
        if len(ent) and not np.isfinite(ent).any():
            fix = ("its weights are damaged or so large that fp32 overflows: use another proxy"
                   if self.dtype == torch.float32 else
                   f"it overflows in {str(self.dtype).removeprefix('torch.')} or its weights are damaged: try --set "
                   f"model.dtype=float32, or use another proxy")
            raise NonFiniteProxyError(f"--proxy {self.path!r} gives non-finite logits (NaN or inf) at every one of the "
                                      f"{len(ent)} positions of a batch, so no position can be scored; {fix}")
        at = 0
        for d, s, e, first in batch:
            out[d][s + first:e] = ent[at:at + e - s - first]
            at += e - s - first


@dataclass
class Sample:
    position: int  # token index t: the context is the document's tokens before t
    byte_offset: int  # where token t starts in the document's UTF-8 bytes
    context_start: int  # first context token (the context is cut to prepare.context_tokens)
    context_ids: list[int]
    continuation_ids: list[int]
    boundaries: list[int]  # cumulative byte lengths of the continuation tokens that end between characters
    entropy: float


def select(doc_index: int, ids: list[int], data: bytes, offsets: np.ndarray, entropy: np.ndarray, cfg
           ) -> tuple[list[Sample], dict[str, int]]:
    """Samples of one document and the fate of each scored position (the split is prepare's: held-out
    documents are chosen across the corpus, rptfast.data.prepare.heldout_documents).

    offsets [n + 1]: byte offset of every token start, then the document's length.
    The capped subset is drawn by a generator seeded with (prepare.seed, document ordinal).
    """
    n = len(ids)
    rng = np.random.default_rng([cfg.seed, doc_index])
    t = np.arange(1, n)
    starts_ok = char_starts(data, offsets)  # [n + 1]
    short = t < cfg.min_context_tokens
    mid = ~short & ~(starts_ok[t] & starts_ok[t + 1])
    nonfinite = ~short & ~mid & ~np.isfinite(entropy[t])
    low = ~short & ~mid & ~nonfinite & ~(entropy[t] >= cfg.min_entropy)
    passing = t[~short & ~mid & ~nonfinite & ~low]
    cap = cfg.max_positions_per_doc
    chosen = passing if not cap or len(passing) <= cap else np.sort(rng.choice(passing, cap, replace=False))
    fates = {"short_context": int(short.sum()), "mid_character": int(mid.sum()), "non_finite": int(nonfinite.sum()),
             "low_entropy": int(low.sum()), "over_cap": len(passing) - len(chosen), "kept": len(chosen)}
    samples = []
    for pos in (int(p) for p in chosen):
        c = max(0, pos - cfg.context_tokens)
        while not starts_ok[c]:
            c += 1
        end = min(pos + cfg.continuation_tokens, n)
        bounds = [int(offsets[j + 1] - offsets[pos]) for j in range(pos, end) if starts_ok[j + 1]]
        last = max(j for j in range(pos, end) if starts_ok[j + 1])
        samples.append(Sample(pos, int(offsets[pos]), c, ids[c:pos], ids[pos:last + 1], bounds,
                              float(entropy[pos])))
    return samples, fates
