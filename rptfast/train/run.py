"""The run: its directory (claimed, locked, resumable), and everything a step needs, built once.

    rptfast train CONFIG [--set section.key=value ...] [--resume]
    torchrun --nproc_per_node=N -m rptfast train CONFIG
"""

from __future__ import annotations

import fcntl
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rptfast import checkpoint, config, distributed
from rptfast.distributed import Dist
from rptfast.errors import check_writable_dir
from rptfast.metrics import MetricsLogger, quiet_startup
from rptfast.model import (
    PolicyLogprob,
    load_policy,
    lora,
    native_dtype,
    resolve_attn,
    resolve_dtype,
    unshared_reason,
    write_scratch_model,
)
from rptfast.rollout import check_model_dir, make_engine
from rptfast.tasks import make_task


class RunDirError(config.ConfigError):
    """The run directory holds another run, is in use, or --resume has nothing to resume."""


# config keys that may differ on --resume: a larger train.steps extends a finished run (with
# schedule = "cosine" the remaining steps follow the curve of the new length); the log keys only
# change what is printed. Anything else would make the resumed run a different run.
RESUME_MAY_DIFFER = ("train.steps", "log.progress", "log.every", "log.tensorboard")


@dataclass
class Run:
    cfg: config.Config
    d: Dist
    run_dir: Path
    tokenizer: object
    task: object
    policy: PolicyLogprob
    ref: PolicyLogprob | None
    optimizer: torch.optim.Optimizer
    engine: object
    logger: MetricsLogger
    cursor: int = 0  # prompts (or pre-training sequences) consumed so far, over all ranks
    n_params: int = 0
    own_engine: bool = True
    final_dtype: torch.dtype = torch.float32  # dtype of the weights in final/
    offloaded: list = field(default_factory=list)  # (device storage, host copy) while the engine runs
    ema: PolicyLogprob | None = None  # info_gain: the no-think baseline, an EMA of the policy's weights


def lock_run_dir(run_dir: Path):
    """An exclusive lock on `run_dir/.lock` (held open until the run ends; the OS drops it when the
    process dies, even on SIGKILL), or a RunDirError naming the process that holds it."""
    check_writable_dir(run_dir, "train.out_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    f = (run_dir / ".lock").open("a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise RunDirError(f"run directory {str(run_dir)!r} is in use by another rptfast process (pid {holder}); "
                          f"wait for it to finish, or set train.out_dir to another directory") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def claim_run_dir(run_dir: Path, cfg: config.Config, resume: bool, d: Dist) -> None:
    """Refuse a directory that holds another run; on --resume, insist the config is the same but for
    RESUME_MAY_DIFFER. A directory whose run never reached a checkpoint (a start that failed, or
    a run killed before its first checkpoint) holds nothing to resume, so a fresh start reuses it."""
    path = run_dir / "config.toml"
    text = config.to_toml(cfg)
    started = checkpoint.latest(run_dir, check=False) is not None or (run_dir / "final").exists()
    if path.exists() and not resume and started:
        raise RunDirError(f"run directory {str(run_dir)!r} already holds a run; pass --resume to continue "
                          f"it, or set train.out_dir to a new directory")
    if resume:
        if not path.exists() or not started:
            raise RunDirError(f"--resume: {str(run_dir)!r} holds no checkpoint to resume; start it without "
                              f"--resume (the directory is reused)")
        try:
            old = config.flat(config.from_dict(tomllib.loads(path.read_text(encoding="utf-8"))))
        except (config.ConfigError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise RunDirError(f"--resume: {str(path)!r} is damaged ({e}); restore it or start a new run") from None
        changed = [k for k, v in config.flat(cfg).items() if old[k] != v and k not in RESUME_MAY_DIFFER]
        if changed:
            raise RunDirError(f"--resume with a different config than the run in {str(run_dir)!r}: "
                              f"{', '.join(changed)} differ; resume with the same config (only "
                              f"{', '.join(RESUME_MAY_DIFFER)} may change)")
    distributed.barrier(d)
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)


def build(cfg: config.Config, resume: bool = False, engine=None) -> tuple[Run, int]:
    """Everything a step needs; returns the run and the step to start from."""
    from transformers import AutoTokenizer

    t = cfg.train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if t.prompts_per_step % world or t.ntp_sequences % world:
        raise config.ConfigError(f"train.prompts_per_step ({t.prompts_per_step}) and train.ntp_sequences "
                                 f"({t.ntp_sequences}) must divide across {world} ranks; make them multiples "
                                 f"of {world}")
    d = distributed.init()
    # fp32 masters (what AdamW updates and checkpoints hold), computed in `dtype`; the engine runs in `dtype`
    master = getattr(torch, t.master_dtype)
    dtype = master if master != torch.float32 else resolve_dtype(cfg.model.dtype, d.device)
    if cfg.train.offload_weights and (world > 1 or dtype != master):
        raise config.ConfigError("train.offload_weights is not supported with FSDP (more than one rank, or a "
                                 "compute dtype other than train.master_dtype) yet; set it to false")
    run_dir = Path(t.out_dir)
    claim_run_dir(run_dir, cfg, resume, d)
    model_dir = cfg.model.path
    if not model_dir:
        model_dir = str(run_dir / "init")
        if d.main and not (resume and (run_dir / "init" / "config.json").exists()):
            write_scratch_model(run_dir / "init", cfg.model, t.seed)  # a reused directory may hold another's
        distributed.barrier(d)
    check_model_dir(model_dir, cfg.rollout.max_model_len)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.model.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise config.ConfigError(f"the tokenizer of model.path {model_dir!r} has no EOS token, so completions "
                                 f"never end; set eos_token in its tokenizer_config.json")
    use_lora = cfg.model.lora_rank > 0
    if use_lora:
        lora.check_targets(model_dir, cfg.model, cfg.model.trust_remote_code)
    own_engine = engine is None
    if own_engine:
        r = cfg.rollout
        with quiet_startup(cfg.log.verbose):  # vLLM's start-up chatter, unless log.verbose
            engine = make_engine(r.engine, model_dir, dtype=dtype, device=d.device, seed=t.seed,
                                 max_model_len=r.max_model_len, gpu_memory_utilization=r.gpu_memory_utilization,
                                 cpu_kv_cache_gib=r.cpu_kv_cache_gib, sleep_level=r.sleep_level,
                                 sync_bucket_mb=r.sync_bucket_mb, enforce_eager=r.enforce_eager,
                                 trust_remote_code=cfg.model.trust_remote_code,
                                 lora=lora.engine_config(cfg.model) if use_lora else None)
    torch.manual_seed(t.seed)  # after the engine: vLLM reseeds the global RNG when it starts
    attn = resolve_attn(cfg.model.attn, d.device, dtype)

    def policy_from(path: str, kind: str, base_of=None) -> PolicyLogprob:
        # the frozen reference needs no masters: it is loaded in the compute dtype; the EMA baseline
        # (info_gain) keeps fp32 masters like the policy, whose small steps it averages. With LoRA only the
        # adapters are masters; the base is frozen in the compute dtype and, where it can be, the tensors of
        # `base_of` (the engine's for the policy, the policy's for the reference and the EMA): one copy
        frozen = kind == "reference"
        adapters = use_lora and not frozen
        lm = load_policy(path, dtype=dtype if frozen or use_lora else master, attn=attn,
                         trust_remote_code=cfg.model.trust_remote_code,
                         gradient_checkpointing=cfg.model.gradient_checkpointing and kind == "policy")
        if adapters:
            lora.add_adapters(lm, cfg.model, master)
        if frozen:
            lm.requires_grad_(False)
        shared, total = lora.share_base(lm, base_of) if base_of is not None else (0, 0)
        if adapters and kind == "policy":
            n_adapter = sum(p.numel() for _, p in lora.adapter_params(lm))
            n_all = sum(p.numel() for p in lm.parameters())
            base = (f"the frozen base ({total / 2**30:.2f} GiB) is {100 * shared / max(total, 1):.0f}% the engine's "
                    f"own tensors" if base_of is not None else "the frozen base is the trainer's own copy "
                    "(model.lora_share_base = false)")
            logger_lines.append(f"LoRA: {n_adapter / 1e6:.2f}M adapter parameters train "
                                f"({100 * n_adapter / n_all:.2f}% of {n_all / 1e6:.1f}M); {base}")
        lm = lm.to(d.device)
        module = PolicyLogprob(lm, cfg.model.logprob, cfg.model.lm_head_fp32)
        if not (use_lora and frozen):  # a LoRA run's reference is the shared base: nothing to shard
            module = distributed.shard(module, lm.model.layers, d, compute_dtype=None if frozen or use_lora else dtype,
                                       only_trainable=use_lora)
        return module if kind == "policy" else module.requires_grad_(False).eval()

    def frozen_of(module: PolicyLogprob):
        """HF name -> the frozen tensor of `module` (the policy's base, for the reference and the EMA)."""
        tensors = {lora.base_name(n): p.detach() for n, p in module.lm.named_parameters() if not p.requires_grad}
        return tensors.get

    logger_lines: list[str] = []
    engine_base = getattr(engine, "base_tensor", None) if use_lora and cfg.model.lora_share_base else None
    policy = policy_from(model_dir, "policy", engine_base)
    policy_base = frozen_of(policy) if use_lora else None
    ref = policy_from(model_dir, "reference", policy_base) if cfg.algorithm.kl_coef > 0 else None
    ema = policy_from(model_dir, "ema", policy_base) if cfg.data.reward == "info_gain" else None
    if ema is not None and use_lora:
        lora.copy_adapters(ema.lm, policy.lm)  # the EMA starts as the policy (peft drew each one's A at random)
    optimizer = make_optimizer(policy, cfg)
    logger = MetricsLogger(run_dir, d.main, t.ntp_steps + t.steps, cfg.log.progress, cfg.log.tensorboard,
                           cfg.log.every, wandb=cfg.log.wandb, trackio=cfg.log.trackio, project=cfg.log.project,
                           run_config=config.flat(cfg))
    unshared = unshared_reason(policy.lm) if t.share_prompts and t.packing == "packed" else None
    if unshared:  # flash_shared's start-up probe runs here, once, on CUDA
        logger.write(f"WARNING train.share_prompts runs unshared (each sequence packed whole: exact, more tokens) with "
                     f"model.attn = {cfg.model.attn!r}: {unshared}")
    for line in logger_lines:
        logger.write(line)
    for warning in config.warnings_for(cfg):
        logger.write(f"WARNING {warning}")
    task = make_task(cfg, tokenizer, t.seed)
    n_params = sum(p.numel() for p in policy.parameters())  # DTensor.numel() is the global size
    final_dtype = native_dtype(model_dir, cfg.model.trust_remote_code) if t.final_dtype == "model" else torch.float32
    run = Run(cfg, d, run_dir, tokenizer, task, policy, ref, optimizer, engine, logger,
              n_params=n_params, own_engine=own_engine, final_dtype=final_dtype, ema=ema)
    start = 0
    if resume:
        ckpt = checkpoint.latest(run_dir, say=logger.write, d=d)
        if ckpt is None:
            raise RunDirError(f"--resume: no intact checkpoint in {str(run_dir / 'checkpoints')!r}; start a new "
                              f"run (without --resume: the directory is reused)")
        state = checkpoint.load(ckpt, policy.lm, optimizer, d, ema=None if ema is None else ema.lm)
        start, run.cursor = state["step"], state["cursor"]
        if start > t.ntp_steps + t.steps:
            raise RunDirError(f"--resume: the checkpoint is at step {start}, past train.ntp_steps + train.steps "
                              f"= {t.ntp_steps + t.steps}; raise train.steps to extend the run")
        logger.write(f"resumed from {ckpt} at step {start}")
    logger.restart_at(start)  # rows a killed run logged after its checkpoint are redone, not duplicated
    return run, start


def make_optimizer(policy: torch.nn.Module, cfg: config.Config) -> torch.optim.Optimizer:
    t = cfg.train
    trainable = [p for p in policy.parameters() if p.requires_grad]  # all of them, or a LoRA run's adapters
    return torch.optim.AdamW(trainable, lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)
