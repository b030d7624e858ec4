"""Rollout engines: G completions per prompt with the logprob of every sampled token.

Two engines implement `RolloutEngine`; the trainer knows nothing else:
- `VLLMEngine` (vllm_engine.py): vLLM in the trainer's own process, sleep mode on CUDA,
  weights swapped in place after every update.
- `TorchEngine` (torch_engine.py): batched sampling over the HF model with a KV cache;
  used where vLLM is absent and as the reference vLLM's logprobs are held to.

Logprobs are those of the temperature-scaled distribution (after top-p, which renormalises
over the nucleus), i.e. the distribution the trainer scores when top_p = 1.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # 0 = greedy (logprobs then of the untempered distribution)
    top_p: float = 1.0
    max_tokens: int = 64


@dataclass
class Completion:
    prompt_index: int  # index into the prompts of the generate call
    sample_index: int  # 0..n-1 within the prompt's group
    token_ids: list[int]  # sampled tokens, EOS included when it was sampled
    logprobs: list[float]  # logprob of each sampled token under the tempered distribution
    finish_reason: str  # "stop" (EOS) or "length" (max_tokens or max_model_len)


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingConfig,
                 seeds: list[int] | None = None) -> list[Completion]:
        """n completions per prompt, ordered by (prompt_index, sample_index).

        seeds[i] seeds prompt i; sample j uses seeds[i] + j (vLLM's convention for n > 1),
        so that what is sampled for a prompt does not depend on its batch neighbours.
        """

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...
    def sleep(self) -> None: ...
    def wake(self) -> None: ...


def check_model_dir(path: str) -> None:
    """A clear error for a local path that is not a HF model directory (hub names pass)."""
    p = Path(path)
    looks_local = p.is_absolute() or path.startswith(".") or p.exists() or path.count("/") >= 2
    if not looks_local:
        return
    if not p.is_dir():
        raise FileNotFoundError(f"model path {path!r} does not exist; give a HF model directory "
                                f"(config.json + weights + tokenizer) or a hub name")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"model path {path!r} is not a HF model directory: it has no config.json")


def check_prompts(prompts: list[list[int]], max_model_len: int) -> None:
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        if len(p) >= max_model_len:
            raise ValueError(f"prompt {i} has {len(p)} tokens, at or over the engine's max length "
                             f"{max_model_len} (rollout.max_model_len); raise it or shorten the prompt "
                             f"(data.max_prompt_tokens)")


def buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
            device: torch.device, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """Move tensors to the engine's device/dtype a bucket at a time and yield them.

    Only one bucket (at most bucket_bytes, or one tensor if it is larger) is resident
    beyond the source at any moment; the source iterator may itself gather lazily
    (e.g. FSDP full tensors), so the whole model never exists twice.
    """
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named_tensors:
        bucket.append((name, t))
        size += t.numel() * t.element_size()
        if size >= bucket_bytes:
            yield from _move(bucket, device, dtype)
            bucket, size = [], 0
    yield from _move(bucket, device, dtype)


def _move(bucket, device, dtype):
    moved = [(n, t.detach().to(device=device, dtype=dtype or t.dtype, non_blocking=True)) for n, t in bucket]
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    yield from moved


class SyncNames:
    """What makes a weight sync complete: every parameter name of the engine's model, each sent once.

    Names stream through `check` (an unknown name raises at once, before the engine sees it);
    `done` then raises if a parameter was never sent, since the engine would keep serving its
    old value. A tied weight (lm_head sharing the embedding) is one parameter under one name,
    as in the HF model's `named_parameters()`, which is what the trainer sends.
    """

    def __init__(self, expected: set[str]):
        self.expected = expected
        self.sent: set[str] = set()

    def check(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in named_tensors:
            if name not in self.expected:
                raise KeyError(f"update_weights: {name!r} is not a parameter of the engine's model "
                               f"(it has e.g. {sorted(self.expected)[:3]}); send the HF model's named_parameters()")
            if name in self.sent:
                raise ValueError(f"update_weights: {name!r} was sent twice in one sync")
            self.sent.add(name)
            yield name, t

    def done(self) -> None:
        missing = self.expected - self.sent
        if missing:
            raise ValueError(f"update_weights must send every parameter of the engine's model: {len(missing)} of "
                             f"{len(self.expected)} were not sent ({', '.join(sorted(missing)[:5])}), and the engine "
                             f"would serve stale values for them")


def hf_parameter_names(model_path: str, trust_remote_code: bool = False) -> set[str]:
    """Parameter names of the HF model at `model_path` (built on the meta device: no memory, no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
    return {name for name, _ in model.named_parameters()}


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def make_engine(kind: str, model_path: str, *, dtype: torch.dtype, device: torch.device, seed: int,
                max_model_len: int, gpu_memory_utilization: float = 0.4, cpu_kv_cache_gib: int = 1,
                sleep_level: int = 1, sync_bucket_mb: int = 256, enforce_eager: bool = False,
                trust_remote_code: bool = False) -> RolloutEngine:
    """Build the engine named by rollout.engine ("auto": vLLM when importable, else torch)."""
    check_model_dir(model_path)
    if kind == "auto":
        kind = "vllm" if vllm_available() else "torch"
    if kind == "vllm":
        if not vllm_available():
            raise RuntimeError("rollout.engine = 'vllm' but vllm is not installed; "
                               "pip install 'rptfast[gpu]' (or [cpu]) or set rollout.engine = 'torch'")
        from rptfast.rollout.vllm_engine import VLLMEngine
        return VLLMEngine(model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
                          gpu_memory_utilization=gpu_memory_utilization, cpu_kv_cache_gib=cpu_kv_cache_gib,
                          sleep_level=sleep_level, bucket_bytes=sync_bucket_mb << 20,
                          enforce_eager=enforce_eager, trust_remote_code=trust_remote_code)
    from rptfast.rollout.torch_engine import TorchEngine
    return TorchEngine(model_path, dtype=dtype, device=device, max_model_len=max_model_len,
                       sleep_level=sleep_level, bucket_bytes=sync_bucket_mb << 20,
                       trust_remote_code=trust_remote_code)
