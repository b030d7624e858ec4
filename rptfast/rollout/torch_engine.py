"""Built-in rollout engine: batched sampling over the HF model with a KV cache.

Used where vLLM is absent (the GPU benchmark machine) and as the reference that vLLM's
logprobs are held to. Each prompt is prefilled once and its KV cache repeated n times;
finished rows are dropped from the batch as they end. Its speed is that of eager HF forwards
(one per generated token, no CUDA graphs, no paged attention), far from vLLM's: benchmarks name
the engine beside every generate figure (rptfast.throughput.ENGINE_LABEL).

Sampling is Gumbel-max with noise from a counter-based hash of (row seed, step, token id),
so a row's tokens depend only on its seed and its logits: not on the batch it shares,
not on the device, not on torch's global RNG. That is what makes sharding prompts across
ranks, or resuming a run, sample the same tokens.

LoRA runs: the engine's model gets the same peft adapters as the trainer's (in the engine's dtype),
replaced by update_adapter; base_tensor lends the trainer its frozen weights, the same tensors (the
layouts are one), which sleep and wake then leave in place: the trainer computes with them.

Left out: paged attention, continuous batching and CUDA graphs (vLLM's job), top-k and
repetition penalties (RL rollouts sample the plain tempered distribution).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from rptfast.model import lora as lora_mod
from rptfast.rollout import Completion, SamplingConfig, SyncNames, buckets, check_prompts

_M = (1 << 63) - 1  # int64 arithmetic wraps; masks keep right shifts logical


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on int64 tensors (wrapping multiply, logical shifts)."""
    x = x ^ ((x >> 30) & (_M >> 29))
    x = x * -4658895280553007687  # 0xbf58476d1ce4e5b9 as int64
    x = x ^ ((x >> 27) & (_M >> 26))
    x = x * -7723592293110705685  # 0x94d049bb133111eb as int64
    return x ^ ((x >> 31) & (_M >> 30))


def gumbel_noise(seeds: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """[R] int64 seeds -> [R, V] fp32 Gumbel(0, 1) noise, a pure function of (seed, step, token)."""
    token = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    x = _mix(_mix(seeds[:, None] * 1000003 + step) + token[None, :])  # [R, V]
    u = (((x >> 40) & 0xFFFFFF).to(torch.float32) + 0.5) / (1 << 24)  # (0, 1), 24 random bits
    return -torch.log(-torch.log(u))


def sample(logits: torch.Tensor, seeds: torch.Tensor, step: int, sampling: SamplingConfig):
    """logits [R, V] -> (tokens [R], logprobs [R]) under the tempered, top-p filtered distribution."""
    logits = logits.float()
    if sampling.temperature == 0:
        logp = torch.log_softmax(logits, -1)
        tok = logp.argmax(-1)
        return tok, logp.gather(-1, tok[:, None])[:, 0]
    logits = logits / sampling.temperature
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs > sampling.top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    logp = torch.log_softmax(logits, -1)
    tok = (logp + gumbel_noise(seeds, step, logits.shape[-1])).argmax(-1)
    return tok, logp.gather(-1, tok[:, None])[:, 0]


class TorchEngine:
    def __init__(self, model_path: str, *, dtype: torch.dtype, device: torch.device, max_model_len: int,
                 sleep_level: int = 1, bucket_bytes: int = 256 << 20, trust_remote_code: bool = False,
                 model: torch.nn.Module | None = None, lora: dict | None = None):
        """lora: the adapter_config.json fields (model.lora.engine_config) of the adapter it will serve."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        if tok.eos_token_id is None:
            raise ValueError(f"the tokenizer of {model_path!r} has no EOS token: set eos_token in its "
                             f"tokenizer_config.json (completions could never stop)")
        self.model = model or AutoModelForCausalLM.from_pretrained(
            model_path, dtype=dtype, trust_remote_code=trust_remote_code)
        self.model.to(device).eval()
        if lora is not None:
            from peft import LoraConfig, inject_adapter_in_model

            inject_adapter_in_model(LoraConfig(r=lora["r"], lora_alpha=lora["lora_alpha"], lora_dropout=0.0,
                                               target_modules=lora["target_modules"]), self.model)
            self.model.to(device=device, dtype=dtype)
        self.adapters = {lora_mod.file_name(n): p for n, p in lora_mod.adapter_params(self.model)}
        self.lent: set[str] = set()  # parameters whose tensors the trainer holds too (base_tensor)
        gen_eos = self.model.generation_config.eos_token_id
        gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []
        self.eos = torch.tensor(sorted({tok.eos_token_id, *gen_eos}), device=device)
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.device, self.dtype = device, dtype
        self.max_model_len = max_model_len
        self.sleep_level = sleep_level
        self.bucket_bytes = bucket_bytes
        self.shapes = {n: p.shape for n, p in self.model.named_parameters()}
        self.stash: dict[str, torch.Tensor] | None = None  # weights while asleep (level 1)
        self.asleep = False

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingConfig,
                 seeds: list[int] | None = None) -> list[Completion]:
        from transformers import DynamicCache

        check_prompts(prompts, self.max_model_len)
        if self.asleep:
            raise RuntimeError("TorchEngine.generate called while asleep: call wake() first")
        P, dev = len(prompts), self.device
        seeds = seeds if seeds is not None else list(range(P))
        # left-padded prompts: ids [P, L], mask [P, L]
        L = max(len(p) for p in prompts)
        ids = torch.full((P, L), self.pad, dtype=torch.long)
        mask = torch.zeros((P, L), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, L - len(p):] = torch.tensor(p)
            mask[i, L - len(p):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1]  # [P, V]
        # each prompt's cache, logits and state repeated for its n samples: rows [R = P * n]
        cache.batch_repeat_interleave(n)
        logits = logits.repeat_interleave(n, 0)
        mask = mask.repeat_interleave(n, 0)
        pos = pos[:, -1].repeat_interleave(n, 0)  # [R] position of the last token
        row_seed = torch.tensor([s + j for s in seeds for j in range(n)], dtype=torch.int64, device=dev)
        limit = torch.tensor([min(sampling.max_tokens, self.max_model_len - len(p))
                              for p in prompts for _ in range(n)], device=dev)  # [R]
        R = P * n
        live = torch.arange(R, device=dev)  # original row index of each batch row
        out_tok = torch.full((R, int(limit.max())), -1, dtype=torch.long, device=dev)
        out_lp = torch.zeros((R, int(limit.max())), dtype=torch.float32, device=dev)
        length = torch.zeros(R, dtype=torch.long, device=dev)
        stopped = torch.zeros(R, dtype=torch.bool, device=dev)
        for step in range(int(limit.max())):
            tok, lp = sample(logits, row_seed[live], step, sampling)
            out_tok[live, step], out_lp[live, step] = tok, lp
            length[live] = step + 1
            eos = torch.isin(tok, self.eos)
            stopped[live] = eos
            keep = ~eos & (step + 1 < limit[live])  # [live]
            if not keep.any():
                break
            if not keep.all():
                idx = keep.nonzero()[:, 0]
                cache.batch_select_indices(idx)
                live, tok, mask, pos = live[idx], tok[idx], mask[idx], pos[idx]
            mask = torch.cat([mask, mask.new_ones(len(live), 1)], 1)
            pos = pos + 1
            logits = self.model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos[:, None],
                                past_key_values=cache, use_cache=True).logits[:, -1]
        out_tok, out_lp, length, stopped = out_tok.cpu(), out_lp.cpu(), length.cpu(), stopped.cpu()
        return [Completion(r // n, r % n, out_tok[r, :length[r]].tolist(), out_lp[r, :length[r]].tolist(),
                           "stop" if stopped[r] else "length") for r in range(R)]

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self.lent or self.adapters:
            raise RuntimeError("update_weights on a LoRA engine (its base may be the trainer's own tensors): send the "
                               "adapter with update_adapter")
        self.wake()
        params = dict(self.model.named_parameters())
        names = SyncNames(set(params))
        for name, t in buckets(names.check(named_tensors), self.bucket_bytes, self.device, self.dtype):
            if params[name].shape != t.shape:
                raise ValueError(f"update_weights: {name!r} has shape {tuple(t.shape)}, the engine's "
                                 f"parameter has {tuple(params[name].shape)}")
            params[name].copy_(t)
        names.done()

    @torch.no_grad()
    def update_adapter(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy a new adapter in (model.lora.adapter_tensors: every matrix, once); returns the bytes received."""
        if not self.adapters:
            raise RuntimeError("update_adapter on an engine started without LoRA (lora=None); send full weights "
                               "with update_weights")
        self.wake()
        names = SyncNames(set(self.adapters))
        nbytes = 0
        for name, t in names.check(named_tensors):
            if self.adapters[name].shape != t.shape:
                raise ValueError(f"update_adapter: {name!r} has shape {tuple(t.shape)}, the engine's adapter has "
                                 f"{tuple(self.adapters[name].shape)}")
            self.adapters[name].copy_(t)
            nbytes += t.numel() * t.element_size()
        names.done()
        return nbytes

    def base_tensor(self, name: str) -> torch.Tensor | None:
        """The engine's own tensor of the HF weight `name` (lent: sleep and wake leave it in place from now on)."""
        for own, p in self.model.named_parameters():
            if lora_mod.base_name(own) == name and not lora_mod.is_adapter(own):
                self.lent.add(own)
                return p.detach()
        return None

    def sleep(self) -> None:
        """Release the weights from the device: to CPU memory (level 1) or dropped (level 2)."""
        if self.asleep:
            return
        own = [(n, p) for n, p in self.model.named_parameters() if n not in self.lent]
        if self.sleep_level == 1:
            pin = self.device.type == "cuda"
            self.stash = {n: p.detach().to("cpu", copy=True).pin_memory() if pin else p.detach().clone()
                          for n, p in own}
        for _, p in own:
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.asleep = True

    def wake(self) -> None:
        """Reallocate the parameters; after a level-2 sleep they hold garbage until update_weights."""
        if not self.asleep:
            return
        for n, p in self.model.named_parameters():
            if n in self.lent:
                continue
            if self.stash is not None:
                p.data = self.stash[n].to(self.device, non_blocking=True)
            else:
                p.data = torch.empty(self.shapes[n], dtype=p.dtype, device=self.device)
        self.stash = None
        self.asleep = False
