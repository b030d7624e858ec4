"""The same RL job through TRL's GRPOTrainer, for the peer comparison in `rptfast bench throughput --trl`.

    python -m rptfast.trl_peer CONFIG.toml --steps K --warmup W --json OUT.json

Run in its own process (so that peak memory is its own). What is matched to rptfast's
run, from the same resolved config:
- model (model.path), dtype (bf16 on CUDA, fp32 on CPU), the same task's prompts in the
  same order and its reward function on the completion token ids;
- group size (rollout.n), prompts per step, max completion tokens, temperature, top_p;
- one optimizer step per generation batch (on-policy), AdamW with the same lr, betas,
  weight decay and grad clip; clip range eps_low/eps_high; no KL (beta = 0) unless
  algorithm.kl_coef says otherwise; advantages scaled by the group std or not;
- loss aggregation: token-mean -> "dapo", seq-mean-token-mean -> "grpo",
  seq-mean-token-sum-norm -> "dr_grpo";
- generation: vLLM colocated in the trainer's process (vllm_mode="colocate", sleep mode
  on CUDA) when vllm imports, as rptfast does; otherwise both sides use HF-style
  sampling and the report says so.
What differs, and why: TRL pads micro-batches (it has no packed path for GRPO), computes
log-probs from full logits, and re-tokenises the prompt text (prompts are passed as text:
exact for the char tokenizer of the parity task, close for BPE).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import torch

from rptfast import config
from rptfast.metrics import peak_memory_gb


def build_trainer(cfg: config.Config, steps: int, out_dir: str, use_vllm: bool):
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rptfast.tasks import make_task

    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    task = make_task(cfg, tok, cfg.train.seed)
    P, n = cfg.train.prompts_per_step, cfg.rollout.n
    prompts = task.prompts(0, P * steps)
    data = Dataset.from_list([{"prompt": tok.decode(p.token_ids), "index": p.index} for p in prompts])
    by_index = {p.index: p for p in prompts}

    def reward(prompts, completions, completion_ids, index, **kwargs):
        return [task.score(by_index[i], ids) for i, ids in zip(index, completion_ids)]

    cuda = torch.cuda.is_available()
    a, t = cfg.algorithm, cfg.train
    args = GRPOConfig(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=P * n, gradient_accumulation_steps=1,
        num_generations=n, max_completion_length=cfg.rollout.max_tokens, temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p, learning_rate=t.lr, adam_beta1=t.beta1, adam_beta2=t.beta2,
        weight_decay=t.weight_decay, max_grad_norm=t.grad_clip or 1e9, lr_scheduler_type="constant",
        warmup_steps=0, num_iterations=1, beta=a.kl_coef, epsilon=a.eps_low, epsilon_high=a.eps_high,
        scale_rewards="group" if a.adv_scale == "group" else "none",
        loss_type={"token-mean": "dapo", "seq-mean-token-mean": "grpo", "seq-mean-token-sum-norm": "dr_grpo"}[
            a.aggregation],
        use_vllm=use_vllm, vllm_mode="colocate", vllm_enable_sleep_mode=cuda and use_vllm,
        vllm_gpu_memory_utilization=cfg.rollout.gpu_memory_utilization, vllm_max_model_length=cfg.rollout.max_model_len,
        bf16=cuda, use_cpu=not cuda, shuffle_dataset=False, logging_steps=1, report_to=[], save_strategy="no",
        seed=t.seed, disable_dropout=True,
    )
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    trainer = GRPOTrainer(model=cfg.model.path, reward_funcs=reward, args=args, train_dataset=data,
                          processing_class=tok, callbacks=[StepTimer()])
    if use_vllm and not cuda:
        sync_by_reload(trainer.vllm_generation)
    return trainer, times


def sync_by_reload(gen) -> None:
    """TRL's colocated sync through vLLM's `model_runner.reload_weights` on the CPU, as rptfast's engine does it.

    vLLM's CPU backend packs linear weights for its GEMM kernels at start-up (seen on AMX machines), after which
    `model.load_weights`, TRL's colocated sync, fails ("'Parameter' object has no attribute 'weight_loader'").
    `reload_weights` runs the loader and the packing again, so the peer does the same work per step as rptfast.
    Left out: re-packing a tied lm_head, which rptfast's engine adds (the peer's timing does not depend on it).
    """
    runner = gen.llm.llm_engine.model_executor.driver_worker.model_runner

    def sync_weights():
        runner.reload_weights(weights_iterator=gen._iter_named_params())
        gen.llm.reset_prefix_cache()

    gen.sync_weights = sync_weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", required=True)
    ap.add_argument("--out-dir", default="runs/trl-peer")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cfg = config.load(args.config)
    use_vllm = importlib.util.find_spec("vllm") is not None and cfg.rollout.engine != "torch"
    trainer, times = build_trainer(cfg, args.warmup + args.steps, args.out_dir, use_vllm)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    measured = times[args.warmup:]
    out = {"step_s": sum(measured) / len(measured), "steps": len(measured), "peak_mem_gb": peak_memory_gb(device),
           "generation": "vllm-colocate" if use_vllm else "transformers generate",
           "trl": __import__("trl").__version__}
    with open(args.json, "w") as f:
        json.dump(out, f)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
