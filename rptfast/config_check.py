"""What a config may hold: the choices and bounds of each key, the combinations that cannot run, and the
legal settings that are probably mistakes (warnings for the run log). config.from_dict calls check()."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from rptfast.errors import ConfigError

if TYPE_CHECKING:
    from rptfast.config import Config

MAX_INT = 2**31 - 1  # any count, length or size beyond this is a typo, not a setting
MAX_SEED = 2**63 - 1  # torch.manual_seed and vLLM take 64-bit seeds

CHOICES = {
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "train.master_dtype": ("float32", "bfloat16"),
    "train.final_dtype": ("model", "float32"),
    "model.attn": ("auto", "flash", "varlen", "sdpa", "per_seq"),
    "model.logprob": ("fused", "logits", "reference"),
    "train.packing": ("packed", "padded"),
    "model.scratch_arch": ("qwen3", "llama"),
    "model.scratch_tokenizer": ("char", "bpe", "toy"),
    "data.task": ("parity", "rpt", "first_token", "toy"),
    "data.parity_reward": ("answer", "chain"),
    "data.reward": ("prefix", "first_token", "info_gain"),
    "rollout.budget_schedule": ("constant", "linear", "cosine"),
    "data.template": ("v0", "candidates", "multi", "context_first", "bare", "answer", "think", "inline"),
    "data.rpt_ntp": ("text", "answers", "thoughts"),
    "prepare.txt_unit": ("file", "paragraph", "line"),
    "eval.split": ("eval", "train", "all"),
    "rollout.engine": ("auto", "vllm", "torch"),
    "algorithm.aggregation": ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"),
    "algorithm.adv_scale": ("group", "none"),
    "algorithm.old_logprobs": ("recompute", "rollout"),
    "train.schedule": ("constant", "cosine"),
}

# key -> (predicate, what a valid value looks like)
BOUNDS = {
    "data.parity_d": (lambda v: v >= 2, "an integer >= 2"),
    "data.parity_p_cot": (lambda v: 0.0 <= v <= 1.0, "a probability in [0, 1]"),
    "data.toy_demos": (lambda v: 0.0 <= v <= 1.0, "a share in [0, 1]"),
    "data.toy_think": (lambda v: 0.0 <= v <= 1.0, "a share in [0, 1]"),
    "data.toy_think_from": (lambda v: v >= 0, "a step >= 0"),
    "data.thought_spans": (lambda v: v >= 1, "an integer >= 1"),
    "data.thought_hint": (lambda v: 0.0 <= v <= 1.0, "a share in [0, 1]"),
    "data.thought_sampled": (lambda v: 0.0 <= v <= 1.0, "a share in [0, 1]"),
    "data.max_prompt_tokens": (lambda v: v >= 8, "an integer >= 8"),
    "data.first_token_set": (lambda v: v >= 1, "an integer >= 1"),
    "data.prompt_len": (lambda v: v >= 1, "an integer >= 1"),
    "model.scratch_layers": (lambda v: v >= 1, "an integer >= 1"),
    "model.scratch_heads": (lambda v: v >= 1, "an integer >= 1"),
    "rollout.n": (lambda v: v >= 2, "an integer >= 2 (a group of 1 has no advantage: every reward is its own mean)"),
    "rollout.temperature": (lambda v: v > 0, "a float > 0"),
    "rollout.top_p": (lambda v: 0 < v <= 1, "a float in (0, 1]"),
    "rollout.max_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "rollout.max_model_len": (lambda v: v >= 2, "an integer >= 2"),
    "rollout.gpu_memory_utilization": (lambda v: 0 < v < 1, "a float in (0, 1)"),
    "rollout.cpu_kv_cache_gib": (lambda v: v >= 1, "an integer >= 1"),
    "rollout.sleep_level": (lambda v: v in (1, 2), "1 or 2"),
    "rollout.sync_bucket_mb": (lambda v: v >= 1, "an integer >= 1"),
    "algorithm.eps_low": (lambda v: 0 <= v < 1, "a float in [0, 1)"),
    "algorithm.eps_high": (lambda v: v >= 0, "a float >= 0"),
    "algorithm.dual_clip": (lambda v: v == 0 or v > 1, "0 (off) or a float > 1"),
    "algorithm.kl_coef": (lambda v: v >= 0, "a float >= 0"),
    "algorithm.tis_cap": (lambda v: v == 0 or v >= 1, "0 (off) or a float >= 1"),
    "algorithm.adv_eps": (lambda v: v >= 0, "a float >= 0"),
    "algorithm.dynamic_sampling_tries": (lambda v: v >= 1, "an integer >= 1"),
    "algorithm.dynamic_sampling_from": (lambda v: v >= 0, "an integer >= 0"),
    "algorithm.updates_per_batch": (lambda v: v >= 1, "an integer >= 1"),
    "algorithm.mismatch_warn": (lambda v: v > 0, "a float > 0"),
    "algorithm.mismatch_stop": (lambda v: v > 0, "a float > 0"),
    "train.steps": (lambda v: v >= 0, "an integer >= 0"),
    "train.ntp_steps": (lambda v: v >= 0, "an integer >= 0"),
    "train.ntp_sequences": (lambda v: v >= 1, "an integer >= 1"),
    "train.ntp_lr": (lambda v: v > 0, "a float > 0"),
    "train.prompts_per_step": (lambda v: v >= 1, "an integer >= 1"),
    "train.micro_batch_tokens": (lambda v: v >= 16, "an integer >= 16"),
    "train.lr": (lambda v: v > 0, "a float > 0"),
    "train.weight_decay": (lambda v: v >= 0, "a float >= 0"),
    "train.beta1": (lambda v: 0 <= v < 1, "a float in [0, 1)"),
    "train.beta2": (lambda v: 0 <= v < 1, "a float in [0, 1)"),
    "train.grad_clip": (lambda v: v >= 0, "a float >= 0 (0 = off)"),
    "train.warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
    "train.ckpt_every": (lambda v: v >= 0, "an integer >= 0"),
    "train.keep_ckpts": (lambda v: v >= 1, "an integer >= 1"),
    "train.max_skipped": (lambda v: v >= 1, "an integer >= 1"),
    "train.seed": (lambda v: 0 <= v <= MAX_SEED, f"an integer in [0, {MAX_SEED}]"),
    "prepare.seed": (lambda v: 0 <= v <= MAX_SEED, f"an integer in [0, {MAX_SEED}]"),
    "train.eval_every": (lambda v: v >= 0, "an integer >= 0"),
    "train.eval_prompts": (lambda v: v >= 1, "an integer >= 1"),
    "log.every": (lambda v: v >= 1, "an integer >= 1"),
    "prepare.min_entropy": (lambda v: v >= 0, "a float >= 0 (0 keeps every position)"),
    "prepare.top_k": (lambda v: v >= 2, "an integer >= 2"),
    "prepare.min_context_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "prepare.max_positions_per_doc": (lambda v: v >= 0, "an integer >= 0 (0 = no cap)"),
    "prepare.continuation_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "prepare.context_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "prepare.proxy_batch_tokens": (lambda v: v >= 2, "an integer >= 2"),
    "prepare.proxy_window": (lambda v: v >= 4, "an integer >= 4"),
    "prepare.shard_samples": (lambda v: v >= 1, "an integer >= 1"),
    "prepare.eval_fraction": (lambda v: 0.0 <= v < 1.0, "a share in [0, 1)"),
    "eval.samples": (lambda v: v >= 0, "an integer >= 0 (0 = all)"),
    "data.info_gain_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "rollout.max_tokens_end": (lambda v: v >= 0, "an integer >= 0 (0: no schedule)"),
    "algorithm.ema_decay": (lambda v: 0 <= v < 1, "a float in [0, 1)"),
    "algorithm.length_coef": (lambda v: v >= 0, "a float >= 0 (0 = off)"),
    "algorithm.length_target": (lambda v: v >= 0, "an integer >= 0"),
    "algorithm.ntp_coef": (lambda v: v >= 0, "a float >= 0 (0 = off)"),
    "model.lora_rank": (lambda v: 0 <= v <= 512, "an integer in [0, 512] (0 = off; vLLM serves ranks up to 512)"),
    "model.lora_alpha": (lambda v: v > 0, "a float > 0"),
    "model.lora_dropout": (lambda v: 0 <= v < 1, "a float in [0, 1)"),
    "model.lora_targets": (lambda v: bool(v.strip(" ,")), "layer names, e.g. q_proj,v_proj, or all-linear"),
    "eval.k": (lambda v: v >= 1, "an integer >= 1"),
    "eval.batch_tokens": (lambda v: v >= 2, "an integer >= 2"),
}


def check(cfg: Config) -> Config:
    """Raise ConfigError on the first impossible value or combination."""
    for key, choices in CHOICES.items():
        value = get(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key} = {value!r} is not one of {', '.join(map(repr, choices))}")
    for key, (ok, what) in BOUNDS.items():
        value = get(cfg, key)
        if not ok(value):
            raise ConfigError(f"{key} = {value!r} is impossible: it must be {what}")
    if cfg.model.path == "" and cfg.data.task not in PRETRAIN_TASKS:
        raise ConfigError("model.path is empty: set it to a HF model directory or hub name "
                          "(training from scratch is only for the parity and toy tasks)")
    if cfg.data.task == "rpt" and not cfg.data.samples:
        raise ConfigError("data.task = 'rpt' needs data.samples: the directory written by `rptfast prepare`")
    if cfg.train.ntp_steps and cfg.data.task not in (*PRETRAIN_TASKS, "rpt"):
        raise ConfigError(f"train.ntp_steps = {cfg.train.ntp_steps}: next-token training needs targets, which only "
                          f"the parity, toy and rpt tasks have; set it to 0 for data.task = {cfg.data.task!r}")
    if cfg.data.task == "toy" and cfg.train.steps:
        raise ConfigError(f"train.steps = {cfg.train.steps} with data.task = 'toy': the toy task is next-token "
                          f"pre-training only; set train.steps = 0 (RPT runs on the prepared store, data.task = 'rpt')")
    if cfg.data.task == "toy" and cfg.data.toy_think < 1 and cfg.data.toy_think_from >= cfg.train.ntp_steps:
        raise ConfigError(f"data.toy_think_from = {cfg.data.toy_think_from} is not before train.ntp_steps = "
                          f"{cfg.train.ntp_steps}, so data.toy_think = {cfg.data.toy_think} would never apply; lower "
                          f"data.toy_think_from (0 applies it from the first step)")
    if cfg.train.steps + cfg.train.ntp_steps == 0:
        raise ConfigError("train.steps and train.ntp_steps are both 0: nothing to train")
    if not cfg.train.out_dir.strip():
        raise ConfigError("train.out_dir is empty; give the run directory, e.g. --set train.out_dir=runs/mine")
    prompt_key, prompt = longest_prompt(cfg)
    r = cfg.rollout
    if cfg.data.task == "parity" and r.max_tokens < cfg.data.parity_d + 1:
        raise ConfigError(f"rollout.max_tokens ({r.max_tokens}) cannot hold the parity chain of data.parity_d + 1 = "
                          f"{cfg.data.parity_d + 1} tokens; raise it")
    if prompt + r.max_tokens > cfg.train.micro_batch_tokens:
        raise ConfigError(f"train.micro_batch_tokens ({cfg.train.micro_batch_tokens}) is smaller than one sequence: "
                          f"prompt ({prompt_key} -> {prompt} tokens) + rollout.max_tokens ({r.max_tokens}); "
                          f"raise it to at least {prompt + r.max_tokens}")
    if prompt + r.max_tokens > r.max_model_len:
        raise ConfigError(f"prompt ({prompt_key} -> {prompt} tokens) + rollout.max_tokens ({r.max_tokens}) exceeds "
                          f"rollout.max_model_len ({r.max_model_len}); raise max_model_len or lower the others")
    if cfg.train.warmup_steps > max(cfg.train.steps, cfg.train.ntp_steps):
        raise ConfigError(f"train.warmup_steps ({cfg.train.warmup_steps}) exceeds train.steps ({cfg.train.steps}) and "
                          f"train.ntp_steps ({cfg.train.ntp_steps}); lower the warmup or raise the steps")
    if cfg.prepare.context_tokens < cfg.prepare.min_context_tokens:
        raise ConfigError(f"prepare.context_tokens ({cfg.prepare.context_tokens}) is below prepare.min_context_tokens "
                          f"({cfg.prepare.min_context_tokens}): a sample could not keep the context it was chosen for")
    if cfg.prepare.proxy_window > cfg.prepare.proxy_batch_tokens:
        raise ConfigError(f"prepare.proxy_window ({cfg.prepare.proxy_window}) exceeds prepare.proxy_batch_tokens "
                          f"({cfg.prepare.proxy_batch_tokens}): one window must fit one forward; lower the window")
    for tracker in ("wandb", "trackio"):  # before anything starts, not after the engine has
        if getattr(cfg.log, tracker) and importlib.util.find_spec(tracker) is None:
            raise ConfigError(f"log.{tracker} = true but {tracker} is not installed; pip install {tracker}, or set "
                              f"log.{tracker}=false")
    if cfg.rollout.sleep_level == 2 and cfg.rollout.engine != "torch":
        raise ConfigError(f"rollout.sleep_level = 2 is refused with rollout.engine = {cfg.rollout.engine!r}: vLLM's "
                          f"level-2 sleep discards buffers such as the rotary caches (vLLM issue 29341) and the "
                          f"weight sync restores parameters only; set rollout.sleep_level = 1, or use "
                          f"rollout.engine = 'torch'")
    if cfg.train.master_dtype != "float32" and cfg.model.dtype not in ("auto", cfg.train.master_dtype):
        raise ConfigError(f"model.dtype = {cfg.model.dtype!r} with train.master_dtype = {cfg.train.master_dtype!r}: "
                          f"compute cannot be wider than the master weights; set model.dtype = 'auto' or "
                          f"train.master_dtype = 'float32'")
    if cfg.rollout.max_tokens >= cfg.rollout.max_model_len:
        raise ConfigError(f"rollout.max_tokens ({cfg.rollout.max_tokens}) must be below rollout.max_model_len "
                          f"({cfg.rollout.max_model_len}) to leave room for the prompt")
    m = cfg.model
    if m.grad_filter and not (m.fused_loss and m.logprob == "fused" and cfg.algorithm.updates_per_batch == 1):
        raise ConfigError("model.grad_filter only acts in the fused loss (model.fused_loss = true, model.logprob = "
                          "'fused', algorithm.updates_per_batch = 1); set model.grad_filter = false")
    check_rpt_family(cfg)
    return cfg


INFO_GAIN_SLACK = 16  # tokens beyond a completion that `</think>` and `\boxed{` take in any tokenizer


def check_rpt_family(cfg: Config) -> None:
    """RPT's successors in the same trainer: the information-gain reward, thought budgets, the NTP mix."""
    r, a = cfg.rollout, cfg.algorithm
    if r.budget_schedule == "constant" and r.max_tokens_end:
        raise ConfigError(f"rollout.max_tokens_end = {r.max_tokens_end} needs rollout.budget_schedule = 'linear' or "
                          f"'cosine' (with 'constant' the budget is rollout.max_tokens); set one, or set it to 0")
    if r.budget_schedule != "constant" and not 1 <= r.max_tokens_end <= r.max_tokens:
        raise ConfigError(f"rollout.budget_schedule = {r.budget_schedule!r} decays rollout.max_tokens "
                          f"({r.max_tokens}) to rollout.max_tokens_end, which must be in [1, {r.max_tokens}], "
                          f"not {r.max_tokens_end}")
    if cfg.data.reward == "info_gain":
        if cfg.data.task != "rpt":
            raise ConfigError(f"data.reward = 'info_gain' scores the ground-truth next tokens of RPT samples; it "
                              f"needs data.task = 'rpt', not {cfg.data.task!r}")
        if cfg.data.template == "answer":
            raise ConfigError("data.reward = 'info_gain' rewards what a thought adds, and data.template = 'answer' "
                              "closes the thought in the prompt (budget 0); use another template, e.g. 'think'")
        if cfg.train.master_dtype != "float32":
            raise ConfigError("data.reward = 'info_gain' keeps an EMA of the policy's weights, which needs fp32 "
                              "masters (a bf16 weight cannot take a 0.001 x step); set train.master_dtype = 'float32'")
        slack = cfg.data.info_gain_tokens + INFO_GAIN_SLACK
        if longest_prompt(cfg)[1] + r.max_tokens + slack > cfg.train.micro_batch_tokens:
            raise ConfigError(f"train.micro_batch_tokens ({cfg.train.micro_batch_tokens}) cannot hold an "
                              f"information-gain scoring sequence: prompt + rollout.max_tokens + `</think>\\boxed{{` "
                              f"+ data.info_gain_tokens (+ {INFO_GAIN_SLACK} tokens of room); raise it to at least "
                              f"{longest_prompt(cfg)[1] + r.max_tokens + slack}")
        if a.dynamic_sampling:
            raise ConfigError("algorithm.dynamic_sampling drops groups whose rewards are all equal, which "
                              "information-gain rewards (continuous) never are; set it to false with "
                              "data.reward = 'info_gain'")
    d = cfg.data
    if not d.think_open.strip() or not d.think_close.strip() or d.think_open == d.think_close:
        raise ConfigError(f"data.think_open ({d.think_open!r}) and data.think_close ({d.think_close!r}) must be two "
                          f"different, non-blank markers, e.g. '<think>' and '</think>'")
    if d.thought_hint + d.thought_sampled > 1:
        raise ConfigError(f"data.thought_hint ({d.thought_hint}) + data.thought_sampled ({d.thought_sampled}) "
                          f"exceeds 1: they are shares of the warm-up's thoughts (the rest are empty); lower one")
    if d.rpt_ntp == "thoughts" and d.template != "inline" and cfg.train.ntp_steps:
        raise ConfigError(f"data.rpt_ntp = 'thoughts' is the warm-up for inline thoughts, and data.template = "
                          f"{d.template!r} wraps prompts in a chat; set data.template = 'inline', or use "
                          f"data.rpt_ntp = 'answers' for a chat template")
    if a.ntp_coef and cfg.data.task != "rpt":
        raise ConfigError(f"algorithm.ntp_coef mixes in the next-token loss of the prompts' context tokens, which "
                          f"only RPT prompts have; set it to 0 for data.task = {cfg.data.task!r}")


PRETRAIN_TASKS = ("parity", "toy")  # tasks with next-token targets (train.ntp_steps, training from scratch)


def longest_prompt(cfg: Config) -> tuple[str, int]:
    """(the key that sets it, the longest prompt of the task in tokens)."""
    if cfg.data.task == "parity":
        return "data.parity_d + 1", cfg.data.parity_d + 1  # d bits and "="
    if cfg.data.task == "first_token":
        return "data.prompt_len", cfg.data.prompt_len
    return "data.max_prompt_tokens", cfg.data.max_prompt_tokens


# below this learning rate, AdamW steps (~lr per element) fall under bf16's spacing (2^-8 relative)
BF16_MASTER_MIN_LR = 1e-4


def warnings_for(cfg: Config) -> list[str]:
    """Settings that are legal but probably not what the user wants: one line each, for the run log."""
    out = []
    lr = min(cfg.train.lr, cfg.train.ntp_lr) if cfg.train.ntp_steps else cfg.train.lr
    if cfg.train.master_dtype == "bfloat16" and lr < BF16_MASTER_MIN_LR:
        out.append(f"train.master_dtype = 'bfloat16' with lr {lr:g} < {BF16_MASTER_MIN_LR:g}: AdamW updates "
                   f"smaller than bf16's resolution (1/256 of a weight) vanish, so most weights never change "
                   f"(at lr 1e-6, 98% of them); set train.master_dtype = 'float32'")
    if cfg.model.lora_rank and cfg.model.lora_dropout:
        out.append(f"model.lora_dropout = {cfg.model.lora_dropout}: the trainer scores the policy with dropout on the "
                   f"adapters while the engine samples it without, so the ratio is not 1 on-policy and the log-prob "
                   f"mismatch grows; RL adapters are usually trained without dropout (0)")
    return out




def get(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)
