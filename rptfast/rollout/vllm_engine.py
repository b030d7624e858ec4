"""vLLM in the trainer's own process.

Why in-process: the weight sync is then a copy between two tensors of one process
(`model_runner.reload_weights(weights_iterator=...)`), with no NCCL group, no Ray and
no second copy of the model in a server. The engine shares the GPU with the trainer by
sleeping (`enable_sleep_mode`) while the trainer works.

Sync order on CUDA: wake the weights, reload them, reset the prefix cache (cached KV
blocks were computed by the old weights), then wake the KV cache. On the CPU, vLLM's
sleep and wake are no-ops; the same calls run so that the choreography is exercised.

LoRA runs (vllm_lora.py): the engine serves one adapter, replaced in memory after each update
(update_adapter), and lends the trainer its base weights (base_tensor); lent, they are never
written and never slept away (the trainer computes with them), and the KV cache stays allocated.

Left out: tensor/pipeline parallelism inside the engine (each rank runs its own engine
on its own GPU) and the async engine (generation is one blocking call per step).
Level-2 sleep is refused: it discards buffers such as the rotary caches, which a parameter
sync does not restore (vLLM issue 29341; TRL reloads from disk instead), and the CPU build,
where sleep is a no-op, cannot test a fix.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable

import torch

from rptfast.rollout import Completion, SamplingConfig, SyncNames, buckets, check_prompts, hf_parameter_names, vllm_lora


class _DropCpuSleepWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "sleep mode is not supported on CPU" not in record.getMessage()


# vLLM's layerwise reload (model_loader/reload/layerwise.py, finalize_layerwise_processing) warns
# "<Layer>: Failed to load weights" for every layer that received no tensor during reload_weights, and
# then puts that layer's previous tensors back (_place_kernel_tensors). A tied lm_head never receives
# one: the checkpoint names the matrix once, as the embedding, and load_weights skips "lm_head.". Its
# previous tensor is the embedding's own Parameter (tie_weights assigned it), which the embedding's
# reload has just overwritten in place (_copy_and_restore_kernel_tensors), so the head is tied again and
# holds the new values: on CUDA that is all the head reads. On the CPU the head also holds a packed copy
# made by process_weights_after_loading, which update_weights re-makes. So the warning, on every sync of
# a tied model, is harmless; tests/test_engines.py checks both facts and counts what this drops.
class _DropTiedHeadReloadWarning(logging.Filter):
    def __init__(self, heads: set[str]):
        super().__init__()
        self.messages = {f"{h}: Failed to load weights" for h in heads}
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage() in self.messages:
            self.dropped += 1
            return False
        return True


def _tied_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules whose weight is the same Parameter as another module's (a tied lm_head and its embedding)."""
    owners: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        weight = module._parameters.get("weight")
        if weight is not None and getattr(module, "quant_method", None) is not None:
            owners.setdefault(id(weight), []).append(module)
    return [m for group in owners.values() if len(group) > 1 for m in group]


class VLLMEngine:
    def __init__(self, model_path: str, *, dtype: torch.dtype, seed: int, max_model_len: int,
                 gpu_memory_utilization: float = 0.4, cpu_kv_cache_gib: int = 1, sleep_level: int = 1,
                 bucket_bytes: int = 256 << 20, enforce_eager: bool = False, trust_remote_code: bool = False,
                 lora: dict | None = None, plain_cpu_weights: bool = False):
        """lora: the adapter_config.json fields (model.lora.engine_config) of the one adapter it will serve;
        plain_cpu_weights: on the CPU, keep the linear weights in vLLM's own (CUDA's) layout, which the trainer
        can view, with torch's GEMM instead of oneDNN's packs (generation about 2x slower; tests, bench/lora.py)."""
        if sleep_level == 2:
            raise ValueError("sleep_level = 2 is refused for the vLLM engine: its level-2 sleep discards buffers such "
                             "as the rotary caches (vLLM issue 29341) and update_weights restores parameters only; "
                             "set rollout.sleep_level = 1")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core runs in this process
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_cache_gib))
        self.cuda = torch.cuda.is_available()
        # vLLM pins torch to one CPU thread for serving and replaces torch.set_num_threads
        # with a no-op; the trainer in this process needs its threads back.
        threads, set_threads = torch.get_num_threads(), torch.set_num_threads
        from vllm import LLM

        plain = vllm_lora.plain_cpu_weights() if plain_cpu_weights and not self.cuda else contextlib.nullcontext()
        with plain:
            self.llm = LLM(
                model=model_path,
                dtype=dtype,
                seed=seed,
                max_model_len=max_model_len,
                gpu_memory_utilization=gpu_memory_utilization,
                enable_sleep_mode=self.cuda,
                enable_prefix_caching=True,
                enforce_eager=enforce_eager or not self.cuda,
                logprobs_mode="processed_logprobs",
                trust_remote_code=trust_remote_code,
                use_tqdm_on_load=False,
                # On the CPU a seeded request whose prefill is split across steps fails ("CPU Generator
                # does not use offset"): schedule whole prompts only, with a budget above any prompt.
                **({} if self.cuda else {"enable_chunked_prefill": False,
                                         "max_num_batched_tokens": max(max_model_len, 8192)}),
                **(vllm_lora.engine_args(lora["r"]) if lora else {}),
            )
        torch.set_num_threads = set_threads
        set_threads(threads)
        for h in logging.getLogger("vllm").handlers:
            h.addFilter(_DropCpuSleepWarning())
        self.max_model_len = max_model_len
        self.sleep_level = sleep_level
        self.bucket_bytes = bucket_bytes
        self.dtype = dtype
        self.asleep = False
        self.runner = self.llm.llm_engine.model_executor.driver_worker.worker.model_runner
        self.device = next(self.runner.model.parameters()).device
        # vLLM fuses and repacks its parameters (qkv_proj, ...): completeness is checked against the HF names
        self.param_names = hf_parameter_names(model_path, trust_remote_code)
        # on the CPU a tied lm_head holds a packed copy of its weight, re-made after each sync (see update_weights)
        tied = _tied_modules(self.runner.model)
        self.tied = [] if self.cuda else tied
        self.reload_warning = _DropTiedHeadReloadWarning({type(m).__name__ for m in tied})
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(self.reload_warning)
        self.adapter = vllm_lora.AdapterSlot(self.llm, self.runner, lora) if lora else None
        if lora and not self.cuda:
            vllm_lora.use_grouped_cpu_ops()
        self.adapter_loaded = False
        self.lent_base = False  # base_tensor handed out a view: the weights stay resident and unwritten
        self._views = None
        if self.llm.get_tokenizer().eos_token_id is None:
            raise ValueError(f"the tokenizer of {model_path!r} has no EOS token: set eos_token in its "
                             f"tokenizer_config.json (completions could never stop)")

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingConfig,
                 seeds: list[int] | None = None) -> list[Completion]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        check_prompts(prompts, self.max_model_len)
        if self.asleep:
            raise RuntimeError("VLLMEngine.generate called while asleep: call wake() first")
        if self.adapter is not None and not self.adapter_loaded:
            raise RuntimeError("VLLMEngine.generate before update_adapter: a LoRA engine serves the trainer's adapter, "
                               "which it has not received yet")
        seeds = seeds if seeds is not None else [None] * len(prompts)
        params = [SamplingParams(n=n, temperature=sampling.temperature, top_p=sampling.top_p,
                                 max_tokens=min(sampling.max_tokens, self.max_model_len - len(p)),
                                 logprobs=0, seed=s)
                  for p, s in zip(prompts, seeds)]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False,
                                 lora_request=None if self.adapter is None else self.adapter.request)
        completions = []
        for i, out in enumerate(outs):
            for c in sorted(out.outputs, key=lambda c: c.index):
                # logprobs=0 returns the sampled token's logprob only
                lps = [step[t].logprob for step, t in zip(c.logprobs, c.token_ids)]
                finish = "stop" if c.finish_reason == "stop" else "length"
                completions.append(Completion(i, c.index, list(c.token_ids), lps, finish))
        return completions

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push new weights in place, a bucket at a time, into the running model; every HF parameter name must come
        (a name left out would keep its old value), and none that the model lacks."""
        if self.lent_base:
            raise RuntimeError("update_weights on an engine that lent its base weights to the trainer (LoRA): it "
                               "would write the trainer's frozen base too; send the adapter with update_adapter")
        woke = self.asleep
        if woke:
            self._wake(["weights"])
        names = SyncNames(self.param_names)
        self.runner.reload_weights(
            weights_iterator=buckets(names.check(named_tensors), self.bucket_bytes, self.device, self.dtype))
        # The reload re-processes only the modules whose names it loaded; on the CPU, processing packs a
        # module's weight into a GEMM handle, so a tied lm_head (never loaded by name) kept its old copy
        # and served stale logits.
        for module in self.tied:
            module.quant_method.process_weights_after_loading(module)
        self.llm.reset_prefix_cache()
        if woke:
            self._wake(["kv_cache"])
        names.done()

    def update_adapter(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Replace the served LoRA adapter, in memory (vllm_lora.AdapterSlot); returns the bytes received."""
        if self.adapter is None:
            raise RuntimeError("update_adapter on an engine started without LoRA (lora=None); send full weights "
                               "with update_weights")
        slept = self.asleep and not self.lent_base  # a lent base never slept (sleep)
        if slept:
            self._wake(["weights"])  # the adapter buffers sleep with the weights
        nbytes = self.adapter.replace(named_tensors)
        self.adapter_loaded = True
        self.llm.reset_prefix_cache()  # cached blocks hold the old adapter's keys and values
        if slept:
            self._wake(["kv_cache"])
        self.asleep = False
        return nbytes

    def base_tensor(self, name: str) -> torch.Tensor | None:
        """The engine's tensor holding the HF weight `name`, or None where its layout has none (vllm_lora)."""
        if self._views is None:
            self._views = vllm_lora.base_views(self.runner.model)
        t = self._views(name)
        self.lent_base |= t is not None
        return t

    def sleep(self) -> None:
        """Release weights and KV cache (vLLM's sleep), unless the trainer holds views of the weights (lent_base):
        then nothing moves, since vLLM's sleep unmaps the weights' memory (level 1 too: it copies them to the
        host and maps them back elsewhere), and the KV cache stays (rollout.gpu_memory_utilization leaves the
        trainer its room; the LoRA presets are sized so)."""
        if not self.asleep:
            if not self.lent_base:
                self.llm.sleep(level=self.sleep_level)
            self.asleep = True

    def wake(self) -> None:
        if self.asleep and self.lent_base:
            self.asleep = False
        elif self.asleep:
            self._wake(None)

    def close(self) -> None:
        """Shut the engine core down (it also tears down torch.distributed's default group)."""
        self.llm.llm_engine.engine_core.shutdown()

    def _wake(self, tags: list[str] | None) -> None:
        self.asleep = not self.llm.wake_up(tags)
