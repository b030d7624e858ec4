"""The policy model, one file per stage of a forward:

- load.py: an HF causal LM from a directory or hub name (or a scratch model), its dtypes;
- packing.py: sequences into packed micro-batches (one row, positions restarting, no padding);
- shared_prompt.py: prompt-once rows (a group's prompt once, then its completions) and their
  exact attention; flash_shared.py: the same attention on CUDA, through FlashAttention's varlen kernels;
- attention.py: the attention backends over packed rows (flash, varlen, sdpa, per_seq);
- policy.py: one forward -> log-probs of the scored tokens, without a [tokens, vocab] tensor;
- lora.py: LoRA through peft: adapters on a frozen base shared with the engine, adapter-only state and export;
- flops.py: counted forward FLOPs, for MFU;
- scratch.py: models and tokenizers made on the spot (scratch training, the tests' fixtures).

The names the rest of rptfast uses are importable from here.
"""

from rptfast.model.attention import (
    PER_SEQ,
    VARLEN,
    resolve_attn,
    shares_prompts,
    torch_varlen_available,
    unshared_reason,
)
from rptfast.model.flops import attention_pairs, flop_rates, forward_flops
from rptfast.model.load import load_policy, native_dtype, resolve_dtype, write_scratch_model
from rptfast.model.packing import MicroBatch, Sequence, collate, pack
from rptfast.model.policy import PolicyLogprob, hidden_states
from rptfast.model.shared_prompt import SharedLayout, collate_shared, pack_shared

__all__ = [
    "PER_SEQ", "VARLEN", "MicroBatch", "PolicyLogprob", "Sequence", "SharedLayout", "attention_pairs", "collate",
    "collate_shared", "flop_rates", "forward_flops", "hidden_states", "load_policy", "native_dtype", "pack",
    "pack_shared", "resolve_attn", "resolve_dtype", "shares_prompts", "torch_varlen_available", "unshared_reason",
    "write_scratch_model",
]  # fmt: skip
