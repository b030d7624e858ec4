"""The policy: loading, attention backends, packing, and log-probs without logits.

Packed training: sequences are concatenated into one row of at most
`train.micro_batch_tokens` tokens, with position ids restarting at every sequence, and
no padding. Attention respects sequence boundaries through one of:
- "flash": flash-attn's varlen kernel (transformers' flash_attention_2 reads the
  boundaries from the position ids), when flash-attn is installed;
- "varlen": torch.nn.attention.varlen.varlen_attn on CUDA, registered below as an
  attention function that receives cu_seqlens;
- "sdpa": scaled_dot_product_attention with the block-diagonal causal mask that
  transformers builds from restarting position ids (O(T^2) mask and attention over the
  whole packed row: the CUDA fallback);
- "per_seq": causal SDPA on each sequence of the row in turn, registered below: exact, and
  no work on the masked-out blocks (the CPU default, where a packed row of 2,048 tokens of
  short sequences ran 3x slower through the block-diagonal mask than padded).

Prompt-once packing (`train.share_prompts`, see `pack_shared`): a group's G completions share
one prompt, so a packed row holds the prompt once and its completions after it. Positions
continue from the prompt; the prompt attends causally to itself, each completion to the
whole prompt and causally to itself, never to another completion. Backends for that mask:
"per_seq" (_SharedAttention: each segment causally against its own keys, and each prompt's
completions all at once against the prompt's keys, merged by log-sum-exp: exact, no work on the
masked blocks, the prompt's keys read once) and "sdpa" (a dense [T, T] boolean mask from the same
rule: exact, O(T^2)). flash and varlen run the unshared packing.

Log-probs of completion tokens come from the final hidden states through
`linear_logprob` (lm_head fused with log-softmax, tiled over the vocabulary), so the
[tokens, vocab] logits tensor is never materialised.
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rptfast.errors import ConfigError, FileFormatError, PathError
from rptfast.kernels import linear_logprob, linear_policy_loss, reference, selective_logprob

VARLEN = "rptfast_varlen"  # torch.nn.attention.varlen on CUDA
PER_SEQ = "rptfast_per_seq"  # causal SDPA on each packed sequence in turn (the CPU default)
SHARED = "rptfast_shared"  # keyword that carries a prompt-once row's SharedLayout to the attention function


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype that model.dtype names ("auto": bf16 on CUDA, fp32 on the CPU)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def native_dtype(path: str, trust_remote_code: bool) -> torch.dtype:
    """The dtype a HF model directory says its weights are in (config.json's torch_dtype; fp32 if unset)."""
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _torch_varlen_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def resolve_attn(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The transformers attn_implementation for model.attn, for attention computed in `dtype`.

    FlashAttention (flash-attn's and torch's varlen, which calls it) takes fp16 and bf16 only: in fp32
    or fp64 "auto" is SDPA with a block-diagonal mask, and naming flash or varlen is a config error.
    """
    half = dtype in (torch.float16, torch.bfloat16)
    if name in ("flash", "varlen") and device.type == "cuda" and not half:
        raise ConfigError(f"model.attn = {name!r} computes in fp16 or bf16 only (FlashAttention), but the model "
                          f"computes in {str(dtype).removeprefix('torch.')}; set model.dtype = 'bfloat16' or "
                          "model.attn = 'auto' (SDPA)")
    flash = device.type == "cuda" and half and importlib.util.find_spec("flash_attn") is not None
    varlen = device.type == "cuda" and half and _torch_varlen_available()
    if name == "auto":
        name = "flash" if flash else "varlen" if varlen else "sdpa" if device.type == "cuda" else "per_seq"
    if name == "flash":
        if not flash:
            raise ConfigError("model.attn = 'flash' needs CUDA and flash-attn (pip install flash-attn); "
                               "use model.attn = 'auto'")
        return "flash_attention_2"
    if name == "varlen":
        if not varlen:
            raise ConfigError("model.attn = 'varlen' needs CUDA and torch.nn.attention.varlen (torch >= 2.10); "
                               "use model.attn = 'auto'")
        _register(VARLEN, _varlen_attention())
        return VARLEN
    if name == "per_seq":
        _register(PER_SEQ, _per_seq_attention)
        return PER_SEQ
    return "sdpa"


def _register(name: str, fn) -> None:
    """An attention function that finds sequence boundaries in cu_seqlens, and no mask."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, lambda *args, **kwargs: None)


def _varlen_attention():
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    # torch 2.10 spells causal as is_causal=True, later releases as window_size=(-1, 0)
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # query [1, Hq, T, D], key/value [1, Hkv, T, D] -> varlen layout [T, H, D]
        cu, max_len = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
        if k.shape[1] != q.shape[1]:  # GQA: one kv head per group of query heads
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        extra = {"scale": scaling} if "scale" in params else {}
        out = varlen_attn(q, k, v, cu, cu, max_len, max_len, **causal, **extra)
        return out[None], None  # [1, T, H, D], as transformers expects from attention functions

    return attention


def _per_seq_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if kwargs.get(SHARED) is not None:
        return _shared_attention(query, key, value, kwargs[SHARED], scaling)
    return _per_seq_unshared(query, key, value, scaling, **kwargs)


def _per_seq_unshared(query, key, value, scaling=None, **kwargs):
    """Causal SDPA within each sequence of the packed row: exact, O(sum L^2) rather than the
    O(T^2) of a block-diagonal mask over the whole row. Sequences of equal length go through
    one batched SDPA call (RL batches repeat lengths: G completions per prompt, many cut at
    max_tokens), so the calls per layer are the distinct lengths, not the sequences.

    Without cu_seqlens, one row takes its boundaries from where the position ids restart at 0
    (as the sdpa path does); several rows ([B, L], right-padded) get one causal SDPA: padding
    after the tokens is never attended to by them, so no mask is needed.
    """
    sdpa = torch.nn.functional.scaled_dot_product_attention
    gqa = key.shape[1] != query.shape[1]
    cu = kwargs.get("cu_seq_lens_q")
    pos = kwargs.get("position_ids")
    if cu is None and pos is not None and query.shape[0] == 1:
        starts = (pos[0] == 0).nonzero()[:, 0]
        cu = torch.cat([starts, starts.new_tensor([pos.shape[1]])])
    if cu is None:
        out = sdpa(query, key, value, is_causal=True, scale=scaling, enable_gqa=gqa)  # [B, H, L, D]
        return out.transpose(1, 2), None
    q, k, v = query[0], key[0], value[0]  # [H, T, D]
    starts, lens = cu[:-1].long(), (cu[1:] - cu[:-1]).long()
    out = torch.zeros_like(q)
    for length in lens.unique().tolist():
        first = starts[lens == length]  # [n]
        idx = (first[:, None] + torch.arange(length, device=q.device)).reshape(-1)  # [n * L]
        n = first.numel()
        part = [x.index_select(1, idx).unflatten(1, (n, length)).transpose(0, 1) for x in (q, k, v)]  # [n, H, L, D]
        o = sdpa(*part, is_causal=True, scale=scaling, enable_gqa=gqa)
        out = out.index_copy(1, idx, o.transpose(0, 1).flatten(1, 2))
    return out.transpose(0, 1)[None], None  # [1, T, H, D]


# the CPU flash-attention kernels that scaled_dot_product_attention dispatches to, called directly for
# their log-sum-exp: [B, Hq, Lq, D] x [B, Hkv, Lk, D] -> out [B, Hq, Lq, D], lse [B, Hq, Lq] fp32 (GQA native)
_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _rows(x: torch.Tensor, idx: torch.Tensor, length: int) -> torch.Tensor:
    """x [H, T, ...] at flat token indices idx [n * length] -> [n, H, length, ...]."""
    return x.index_select(1, idx).unflatten(1, (idx.numel() // length, length)).transpose(0, 1)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[n, H, length, ...] -> [H, n * length, ...], the inverse of _rows's reshape."""
    return x.transpose(0, 1).flatten(1, 2)


def _shared_attention(query, key, value, layout: SharedLayout, scaling=None):
    """Attention over a prompt-once row (per_seq backend): query [1, Hq, T, D], key/value [1, Hkv, T, D]
    -> [1, T, Hq, D]. See _SharedAttention."""
    out = _SharedAttention.apply(query[0], key[0], value[0], layout, scaling)  # [Hq, T, D]
    return out.transpose(0, 1)[None], None


class _SharedAttention(torch.autograd.Function):
    """Exact attention over a prompt-once row in two parts, merged by log-sum-exp.

    own:   every segment (a prompt or a completion) against its own keys, causal; segments of equal
           length in one flash call.
    cross: a unit's completions (all of them, one after another) against its prompt's keys, no mask;
           units of equal prompt length in one call, their completion queries padded to the batch's
           longest (padding at most 1/4 of a batch's queries, else a new batch).
    A completion token's output is (e^lse_own o_own + e^lse_cross o_cross) / (e^lse_own + e^lse_cross),
    in fp32; a prompt token's is its own part alone. Nothing is masked inside a call, so the masked-out
    blocks (other completions, other units) are never computed and the prompt's keys and values are read
    once per unit, not gathered once per completion.

    The CPU flash kernels return a log-sum-exp but no gradient through it, so the backward is written
    here: each part's backward is the kernel's, given the merged output and merged log-sum-exp (the
    probabilities it recomputes, exp(s - lse), are then those of the full softmax over both parts, and
    its rowsum(dO * O) term is the full one), and the parts' gradients add up.
    Left out: dropout (the trainer sets it to 0) and sliding windows (shares_prompts refuses them).
    """

    @staticmethod
    def forward(ctx, q, k, v, layout: SharedLayout, scale: float | None):
        # q [Hq, T, D], k/v [Hkv, T, D]
        H, T, D = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)  # the merge's dtype: fp32 (fp64 for fp64 inputs)
        out = q.new_empty(H, T, D, dtype=acc)  # [Hq, T, D]: the own part, then merged in place at completion tokens
        lse = q.new_empty(H, T, dtype=acc)  # [Hq, T]
        for length, idx in layout.own:
            o, lse_own = _flash_fwd(*(_rows(x, idx, length) for x in (q, k, v)), 0.0, True, scale=scale)
            out.index_copy_(1, idx, _flat(o).to(acc))
            lse.index_copy_(1, idx, _flat(lse_own))
        for p_len, q_len, k_idx, q_idx, pad in layout.cross:
            o, lse_x = _flash_fwd(_rows(q, q_idx, q_len), _rows(k, k_idx, p_len), _rows(v, k_idx, p_len), 0.0, False,
                                  scale=scale)
            real = ~pad.flatten()
            dst = q_idx[real]  # [Q] completion tokens, each in exactly one cross batch
            o, lse_x = _flat(o)[:, real].to(acc), _flat(lse_x)[:, real]  # [Hq, Q, D], [Hq, Q]
            lse_own = lse[:, dst]
            lse_m = torch.logaddexp(lse_own, lse_x)
            merged = ((lse_own - lse_m).exp()[..., None] * out[:, dst]
                      + (lse_x - lse_m).exp()[..., None] * o)  # [Hq, Q, D]
            out.index_copy_(1, dst, merged)
            lse.index_copy_(1, dst, lse_m)
        out = out.to(q.dtype)  # one rounding to the compute dtype, after the merge
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.scale = layout, scale
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse = ctx.saved_tensors
        layout, scale = ctx.layout, ctx.scale
        d_out = d_out.contiguous()
        acc = torch.promote_types(q.dtype, torch.float32)  # the parts' gradients add up in fp32
        # every token is in exactly one own-part call, so these are all written
        dq, dk, dv = (torch.empty_like(x, dtype=acc) for x in (q, k, v))
        for length, idx in layout.own:
            g = _flash_bwd(*(_rows(x, idx, length) for x in (d_out, q, k, v, out, lse)), 0.0, True, scale=scale)
            for grad, part in zip((dq, dk, dv), g):
                grad.index_copy_(1, idx, _flat(part).to(acc))
        for p_len, q_len, k_idx, q_idx, pad in layout.cross:
            # padding queries: zero gradient and output, and a log-sum-exp of +inf (probabilities exp(s - inf) = 0
            # whatever the scores), so they add exactly zero to dq, dk and dv
            gq, gk, gv = _flash_bwd(_rows(d_out, q_idx, q_len).masked_fill(pad[..., None], 0), _rows(q, q_idx, q_len),
                                    _rows(k, k_idx, p_len), _rows(v, k_idx, p_len),
                                    _rows(out, q_idx, q_len).masked_fill(pad[..., None], 0),
                                    _rows(lse, q_idx, q_len).masked_fill(pad, float("inf")), 0.0, False, scale=scale)
            dq.index_add_(1, q_idx, _flat(gq).to(acc))
            dk.index_add_(1, k_idx, _flat(gk).to(acc))
            dv.index_add_(1, k_idx, _flat(gv).to(acc))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def load_policy(path: str, *, dtype: torch.dtype, attn: str, trust_remote_code: bool,
                gradient_checkpointing: bool):
    """An HF causal LM from a directory or hub name, with the attention backend set."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn,
                                                     trust_remote_code=trust_remote_code)
    except SafetensorError as e:
        raise FileFormatError(f"cannot load model {path!r}: a weights file is corrupt ({e}); download or save "
                              f"the model again") from None
    except OSError as e:
        raise PathError(f"cannot load model {path!r}: {e}. Give a HF model directory or a hub name "
                        f"(model.path)") from None
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    # training mode (checkpointing only recomputes there) without dropout: the engine samples
    # from the dropout-free function, so that is the one the trainer must score
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
    return model


def write_scratch_model(out: Path, model_cfg, seed: int) -> Path:
    """A randomly initialised model of a standard architecture for from-scratch training (parity, toy)."""
    from rptfast.testing import make_tiny_model

    heads = model_cfg.scratch_heads
    vocab = 32 if model_cfg.scratch_tokenizer in ("char", "toy") else 512
    return make_tiny_model(out, model_cfg.scratch_arch, vocab=vocab, layers=model_cfg.scratch_layers, seed=seed,
                           tokenizer=model_cfg.scratch_tokenizer, hidden=64 * heads, heads=heads,
                           kv_heads=heads, intermediate=4 * 64 * heads, init_std=0.02)


@dataclass
class Sequence:
    """One prompt + completion (or context + target) as the trainer sees it."""

    tokens: list[int]  # prompt then completion
    start: int  # index of the first scored token (the completion's first)
    advantage: float = 0.0
    rollout_logprobs: list[float] | None = None  # the engine's logprob of each scored token

    @property
    def n_scored(self) -> int:
        return len(self.tokens) - self.start


@dataclass
class MicroBatch:
    """Sequences for one forward: packed into one row of T tokens (the default), or padded
    to [B, L] (the ablation); R scored tokens in S sequences either way."""

    input_ids: torch.Tensor  # packed: [T]; padded: [B, L]
    position_ids: torch.Tensor  # same shape; packed positions restart at 0 for every sequence
    cu_seqlens: torch.Tensor  # [S + 1] int32 sequence boundaries in the packed row
    max_len: int
    pred_idx: torch.Tensor  # [R] flat position whose hidden state predicts each scored token
    targets: torch.Tensor  # [R] the scored tokens
    seq_ids: torch.Tensor  # [R] index of each scored token's sequence within this micro-batch
    advantages: torch.Tensor  # [R]
    rollout_logprobs: torch.Tensor  # [R] (zeros when the sequences carry none)
    mask: torch.Tensor  # [R] bool: False only in the padding micro-batch of a rank with fewer
    attention_mask: torch.Tensor | None = None  # padded only: [B, L]
    shared: SharedLayout | None = None  # prompt-once rows only (collate_shared); cu_seqlens then holds segments

    @property
    def n_tokens(self) -> int:
        """Real tokens (padding excluded)."""
        return int(self.cu_seqlens[-1])


@dataclass
class SharedLayout:
    """How a prompt-once row is cut into segments, and the index tensors of _SharedAttention's calls.

    A segment is a prompt (keys: its own tokens, causal) or a completion (keys: its prompt, then
    its own tokens, causal bottom-right aligned). Segments tile the row in order; a unit is a prompt
    and the completions after it.
    """

    segments: list[tuple[int, int, int, int]]  # (start, length, prompt start, prompt length); prompt length 0: a prompt
    own: list[tuple[int, torch.Tensor]]  # per segment length L: (L, token indices [n * L]), n segments of that length
    # per batch of units of equal prompt length: (p_len, q_len, prompt token indices [n * p_len], completion token
    # indices [n * q_len] (padding reads token 0), padding [n, 1, q_len] bool)
    cross: list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]]

    PAD_FRACTION = 0.25  # a cross batch takes another unit only while its padding queries stay below this share

    @classmethod
    def build(cls, segments: list[tuple[int, int, int, int]], device: torch.device) -> SharedLayout:
        """Index tensors of each batched call, made once per micro-batch (every layer uses them)."""
        by_len: dict[int, list[int]] = {}
        units: dict[int, list[int]] = {}  # prompt start -> its completions' tokens, in row order
        p_lens: dict[int, int] = {}
        for start, length, p_start, p_len in segments:
            by_len.setdefault(length, []).extend(range(start, start + length))
            if p_len:
                units.setdefault(p_start, []).extend(range(start, start + length))
                p_lens[p_start] = p_len
        t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
        own = [(length, t(idx)) for length, idx in by_len.items()]
        by_p: dict[int, list[int]] = {}
        for p_start in units:
            by_p.setdefault(p_lens[p_start], []).append(p_start)
        cross = []
        for p_len, starts in by_p.items():
            starts.sort(key=lambda s: -len(units[s]))
            batches: list[list[int]] = []
            for s in starts:  # longest first, so a batch's first unit sets its padded length
                b = batches[-1] if batches else []
                real = sum(len(units[u]) for u in b) + len(units[s])  # queries with s added; padded: (n + 1) q_len
                if b and real >= (1 - cls.PAD_FRACTION) * (len(b) + 1) * len(units[b[0]]):
                    b.append(s)
                else:
                    batches.append([s])
            for b in batches:
                q_len = len(units[b[0]])
                k_idx = [i for s in b for i in range(s, s + p_len)]
                q_idx = [i for s in b for i in units[s] + [0] * (q_len - len(units[s]))]
                pad = [[i >= len(units[s]) for i in range(q_len)] for s in b]
                cross.append((p_len, q_len, t(k_idx), t(q_idx), torch.tensor(pad, device=device)[:, None]))
        return cls(segments, own, cross)

    def token_ids(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token: its unit (a prompt and the completions after it) and its completion (0: the prompt)."""
        unit, comp = [], []
        units: dict[int, int] = {}  # prompt start -> unit id
        n_comp: dict[int, int] = {}
        for start, length, p_start, p_len in self.segments:
            if p_len == 0:
                units[start], n_comp[start] = len(units), 0
            else:
                n_comp[p_start] += 1
            unit += [units[p_start]] * length
            comp += [n_comp[p_start]] * length
        return torch.tensor(unit), torch.tensor(comp)

    def dense_mask(self, device: torch.device) -> torch.Tensor:
        """[T, T] bool, True where a query (row) may attend to a key (column): same unit, key not
        after the query, and the key in the prompt or in the query's own completion."""
        unit, comp = (x.to(device) for x in self.token_ids())
        idx = torch.arange(unit.numel(), device=device)
        return ((unit[:, None] == unit[None, :]) & (idx[None, :] <= idx[:, None])
                & ((comp[None, :] == 0) | (comp[None, :] == comp[:, None])))

    @property
    def attention_pairs(self) -> int:
        return sum(length * p_len + length * (length + 1) // 2 for _, length, _, p_len in self.segments)


def pack(seqs: list[Sequence], budget: int, padded: bool = False) -> list[list[int]]:
    """Group sequence indices into micro-batches of at most `budget` tokens, longest first.

    Packed: first-fit decreasing on lengths. Padded: a micro-batch costs its size times its
    longest sequence, so runs of similar lengths are cut where the next one would not fit.
    """
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i].tokens))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(seqs[i].tokens)
        if n > budget:
            raise ValueError(f"a sequence of {n} tokens does not fit train.micro_batch_tokens = {budget}; "
                             f"raise it to at least {n} (prompt + rollout.max_tokens)")
        if padded:
            if bins and (len(bins[-1]) + 1) * len(seqs[bins[-1][0]].tokens) <= budget:
                bins[-1].append(i)
            else:
                bins.append([i])
            continue
        for b, r in enumerate(room):
            if n <= r:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(budget - n)
    return [sorted(b) for b in bins]


def collate(seqs: list[Sequence], idx: list[int], device: torch.device, masked: bool = False,
            padded: bool = False) -> MicroBatch:
    """seqs[idx] as one micro-batch (masked=True: one that contributes nothing)."""
    L = max(len(seqs[i].tokens) for i in idx)
    ids, pos, cu, pred, tgt, sid, adv, rlp = [], [], [0], [], [], [], [], []
    for k, i in enumerate(idx):
        s = seqs[i]
        off = k * L if padded else cu[-1]
        ids += s.tokens + ([0] * (L - len(s.tokens)) if padded else [])
        pos += list(range(len(s.tokens))) + ([0] * (L - len(s.tokens)) if padded else [])
        cu.append(cu[-1] + len(s.tokens))
        pred += range(off + s.start - 1, off + len(s.tokens) - 1)
        tgt += s.tokens[s.start:]
        sid += [k] * s.n_scored
        adv += [s.advantage] * s.n_scored
        rlp += s.rollout_logprobs if s.rollout_logprobs is not None else [0.0] * s.n_scored
    t = lambda x, dt: torch.tensor(x, dtype=dt, device=device)  # noqa: E731
    attention_mask = None
    ids_t, pos_t = t(ids, torch.long), t(pos, torch.long)
    if padded:
        ids_t, pos_t = ids_t.view(len(idx), L), pos_t.view(len(idx), L)
        attention_mask = (torch.arange(L, device=device)[None, :] <
                          t([len(seqs[i].tokens) for i in idx], torch.long)[:, None]).long()
    return MicroBatch(ids_t, pos_t, t(cu, torch.int32), L, t(pred, torch.long), t(tgt, torch.long),
                      t(sid, torch.long), t(adv, torch.float32), t(rlp, torch.float32),
                      torch.full((len(tgt),), not masked, dtype=torch.bool, device=device), attention_mask)


def pack_shared(seqs: list[Sequence], budget: int) -> list[list[int]]:
    """Group sequence indices into prompt-once micro-batches of at most `budget` tokens.

    Sequences with the same prompt (tokens before `start`) form a unit that costs the prompt
    once plus each completion. A unit larger than the budget is split into parts, first-fit
    decreasing on completion lengths, each part paying for its own copy of the prompt; the parts
    are then packed first-fit decreasing like sequences. Two parts of one prompt never land in
    one micro-batch (they would have been one part), so collate_shared can regroup a bin by prompt.
    """
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(seqs):
        by_prompt.setdefault(tuple(s.tokens[:s.start]), []).append(i)
    units: list[tuple[int, list[int]]] = []  # (tokens, sequence indices)
    for prompt, members in by_prompt.items():
        P = len(prompt)
        parts: list[list[int]] = []
        room: list[int] = []
        for i in sorted(members, key=lambda i: -seqs[i].n_scored):
            n = seqs[i].n_scored
            if P + n > budget:
                raise ValueError(f"a sequence of {P + n} tokens does not fit train.micro_batch_tokens = {budget}; "
                                 f"raise it to at least {P + n} (prompt + rollout.max_tokens)")
            for b, r in enumerate(room):
                if n <= r:
                    parts[b].append(i)
                    room[b] -= n
                    break
            else:
                parts.append([i])
                room.append(budget - P - n)
        units += [(budget - r, part) for part, r in zip(parts, room)]
    bins: list[list[int]] = []
    room = []
    for n, part in sorted(units, key=lambda u: -u[0]):
        for b, r in enumerate(room):
            if n <= r:
                bins[b] += part
                room[b] -= n
                break
        else:
            bins.append(list(part))
            room.append(budget - n)
    return [sorted(b) for b in bins]


def collate_shared(seqs: list[Sequence], idx: list[int], device: torch.device) -> MicroBatch:
    """seqs[idx] as one prompt-once row: per distinct prompt, the prompt, then each completion.

    Positions: the prompt's 0..P-1, every completion's P..P+R-1. The prompt's last hidden state
    predicts the first token of every completion. Scored tokens come in the order of `idx`,
    sequence by sequence, as in `collate`, so both give the same [R] layout for the same idx.
    """
    units: dict[tuple[int, ...], list[int]] = {}
    for i in idx:
        units.setdefault(tuple(seqs[i].tokens[:seqs[i].start]), []).append(i)
    ids: list[int] = []
    pos: list[int] = []
    segments: list[tuple[int, int, int, int]] = []
    where: dict[int, tuple[int, int]] = {}  # sequence -> (its prompt's last position, its completion's first)
    for prompt, members in units.items():
        p0, P = len(ids), len(prompt)
        ids += prompt
        pos += range(P)
        segments.append((p0, P, p0, 0))
        for i in members:
            completion = seqs[i].tokens[seqs[i].start:]
            where[i] = (p0 + P - 1, len(ids))
            if completion:
                segments.append((len(ids), len(completion), p0, P))
                pos += range(P, P + len(completion))
                ids += completion
    pred, tgt, sid, adv, rlp = [], [], [], [], []
    for k, i in enumerate(idx):
        s = seqs[i]
        last, first = where[i]
        pred += [last, *range(first, first + s.n_scored - 1)] if s.n_scored else []
        tgt += s.tokens[s.start:]
        sid += [k] * s.n_scored
        adv += [s.advantage] * s.n_scored
        rlp += s.rollout_logprobs if s.rollout_logprobs is not None else [0.0] * s.n_scored
    cu = [0]
    for _, length, _, _ in segments:
        cu.append(cu[-1] + length)
    t = lambda x, dt: torch.tensor(x, dtype=dt, device=device)  # noqa: E731
    return MicroBatch(t(ids, torch.long), t(pos, torch.long), t(cu, torch.int32), max(s[1] for s in segments),
                      t(pred, torch.long), t(tgt, torch.long), t(sid, torch.long), t(adv, torch.float32),
                      t(rlp, torch.float32), torch.ones(len(tgt), dtype=torch.bool, device=device),
                      shared=SharedLayout.build(segments, device))


def shares_prompts(lm: nn.Module) -> bool:
    """Whether lm's attention backend runs prompt-once rows. per_seq on the CPU and sdpa do; flash and
    varlen are not wired (they would need separate query and key cu_seqlens over gathered keys, untestable
    without a GPU), and neither is per_seq off the CPU (_SharedAttention calls the CPU flash kernels), so
    those run unshared. Sliding-window layers are outside the shared mask too."""
    layer_types = getattr(lm.config, "layer_types", None) or ["full_attention"]
    backend = lm.config._attn_implementation
    return ((backend == "sdpa" or backend == PER_SEQ and lm.device.type == "cpu")
            and set(layer_types) == {"full_attention"})


def attention_pairs(mb: MicroBatch) -> int:
    """(query, key) pairs the micro-batch's mask lets through: what exact attention computes."""
    if mb.shared is not None:
        return mb.shared.attention_pairs
    lens = (mb.cu_seqlens[1:] - mb.cu_seqlens[:-1]).long()
    return int((lens * (lens + 1) // 2).sum())


def flop_rates(lm: nn.Module) -> tuple[int, int, int]:
    """Forward FLOPs of lm (per token, per scored token, per attended (query, key) pair).

    Per token: 2 per weight of the decoder's matrices (the embedding lookup is free). Per scored
    token: 2 V H for lm_head (only scored positions reach it). Per pair: 4 per query-head
    dimension per layer (QK^T and PV). Norms, rotary and activations are left out (small).
    """
    c = lm.config
    body = sum(p.numel() for n, p in lm.named_parameters()
               if p.dim() == 2 and "embed_tokens" not in n and "lm_head" not in n)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * body, 2 * c.vocab_size * c.hidden_size, 4 * c.num_hidden_layers * c.num_attention_heads * head_dim


def forward_flops(rates: tuple[int, int, int], mb: MicroBatch) -> int:
    """Counted forward FLOPs of one micro-batch (see flop_rates); its backward counts twice as many."""
    per_token, per_scored, per_pair = rates
    return per_token * mb.n_tokens + per_scored * int(mb.mask.numel()) + per_pair * attention_pairs(mb)


def hidden_states(lm: nn.Module, mb: MicroBatch) -> torch.Tensor:
    """Final hidden states of a micro-batch, flat: [T, H] packed, [B*L, H] padded (pred_idx indexes it).

    The one place a forward is run on packed rows: backends that read sequence boundaries from
    cu_seqlens get them here; sdpa finds them in the restarting position ids.
    """
    if mb.attention_mask is not None:  # padded [B, L]
        return lm.base_model(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                             position_ids=mb.position_ids).last_hidden_state.flatten(0, 1)  # [B*L, H]
    if mb.shared is not None:
        return _shared_hidden_states(lm, mb)
    kwargs = {}
    if lm.config._attn_implementation in ("flash_attention_2", VARLEN, PER_SEQ):
        kwargs = dict(cu_seq_lens_q=mb.cu_seqlens, cu_seq_lens_k=mb.cu_seqlens,
                      max_length_q=mb.max_len, max_length_k=mb.max_len)
    return lm.base_model(input_ids=mb.input_ids[None], position_ids=mb.position_ids[None],
                         **kwargs).last_hidden_state[0]  # [T, H]


def _shared_hidden_states(lm: nn.Module, mb: MicroBatch) -> torch.Tensor:
    """hidden_states of a prompt-once row: per_seq gets the layout, sdpa a dense [T, T] mask."""
    if not shares_prompts(lm):
        raise ValueError(f"a prompt-once micro-batch needs model.attn = per_seq or sdpa and full attention in every "
                         f"layer, not {lm.config._attn_implementation!r}; set train.share_prompts = false")
    ids, pos = mb.input_ids[None], mb.position_ids[None]
    if lm.config._attn_implementation == PER_SEQ:
        return lm.base_model(input_ids=ids, position_ids=pos, **{SHARED: mb.shared}).last_hidden_state[0]  # [T, H]
    mask = mb.shared.dense_mask(mb.input_ids.device)[None, None]  # [1, 1, T, T]
    return lm.base_model(input_ids=ids, position_ids=pos,
                         attention_mask={"full_attention": mask}).last_hidden_state[0]  # [T, H]


class PolicyLogprob(nn.Module):
    """Wraps the HF model so that one forward returns log-probs of scored tokens.

    It is the FSDP root: inside forward, lm_head's weight is unsharded, which is why the
    fused lm_head + log-softmax runs here and not outside the module.

    `logprob` picks how log-probs leave the hidden states: "fused" (linear_logprob, no
    logits tensor), "logits" (lm_head, then the selective_logprob kernel) or "reference"
    (lm_head, then a full fp32 log-softmax): the last two exist for the throughput ablation.

    Under bf16/fp16 compute the lm_head runs in the compute dtype, logits rounded to it, as the
    engine's does (softmax math is fp32 either way); `lm_head_fp32` casts the final hidden
    states and the lm_head weight to fp32 instead (TRL's cast_lm_head_to_fp32), at the cost of an
    fp32 copy of the weight per forward. docs/performance.md has the measured mismatch both ways.
    """

    def __init__(self, lm: nn.Module, logprob: str = "fused", lm_head_fp32: bool = False):
        super().__init__()
        self.lm = lm
        self.logprob = logprob
        self.lm_head_fp32 = lm_head_fp32

    def forward(self, mb: MicroBatch, temperature: float, loss: dict | None = None) -> tuple[torch.Tensor, ...]:
        """(logp [R], entropy [R]) of the scored tokens; with `loss` (linear_policy_loss's options, the
        token tensors included), linear_policy_loss's (loss, metrics, logp, entropy) instead, the
        gradient made in this pass (logprob = "fused" only)."""
        h = hidden_states(self.lm, mb).index_select(0, mb.pred_idx)  # [R, H]
        weight = self.lm.get_output_embeddings().weight  # [V, H]
        if self.lm_head_fp32:
            h, weight = h.float(), weight.float()
        if loss is not None:
            if self.logprob != "fused":
                raise ValueError(f"the fused loss needs model.logprob = 'fused', not {self.logprob!r}; "
                                 "set model.fused_loss = false for the logits ablations")
            return linear_policy_loss(h, weight, mb.targets, temperature=temperature, **loss)
        if self.logprob == "fused":
            return linear_logprob(h, weight, mb.targets, temperature, return_entropy=True)
        logits = h @ weight.T  # [R, V]
        if self.logprob == "logits":
            return selective_logprob(logits, mb.targets, temperature, return_entropy=True)
        return reference.selective_logprob(logits.float(), mb.targets, temperature, return_entropy=True)
