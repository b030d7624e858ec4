"""The GRPO loop, with an optional next-token pre-training phase before it.

    rptfast train CONFIG [--set section.key=value ...] [--resume]
    torchrun --nproc_per_node=N -m rptfast train CONFIG

One RL step (see `rl_step`): the engine generates G completions per prompt -> the task
scores them -> group advantages -> (dynamic sampling drops all-equal groups and refills)
-> the engine sleeps, the trainer's optimizer state comes back -> packed forward and
backward with the clipped policy loss -> AdamW -> optimizer state out, new weights into
the engine, which wakes.

What it leaves out of the textbook, on purpose:
- no value model, no GAE: the group mean is the baseline (GRPO);
- with one update per batch and `old_logprobs = "recompute"`, the old log-probs are the
  training forward's own values, detached (ratio = 1): the same numbers a separate
  no-grad pass would give, for one forward less;
- no entropy bonus (the RPT paper uses none);
- the reference model for the KL is the initial policy, kept frozen beside the trainer.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import os
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rptfast import checkpoint, config, distributed
from rptfast.distributed import Dist, all_gather_objects, all_max, all_sum, full_tensors
from rptfast.errors import NonFiniteError, TrainingStopped, check_writable_dir
from rptfast.kernels import group_advantages, policy_loss
from rptfast.metrics import MetricsLogger, Timer, peak_flops, peak_memory_gb, quiet_startup
from rptfast.model import (
    MicroBatch,
    PolicyLogprob,
    Sequence,
    collate,
    collate_shared,
    flop_rates,
    forward_flops,
    load_policy,
    native_dtype,
    pack,
    pack_shared,
    resolve_attn,
    resolve_dtype,
    shares_prompts,
    write_scratch_model,
)
from rptfast.rollout import SamplingConfig, check_model_dir, make_engine
from rptfast.tasks import Prompt, make_task


class RunDirError(config.ConfigError):
    """The run directory holds another run, is in use, or --resume has nothing to resume."""


# config keys that may differ on --resume: a larger train.steps extends a finished run (with
# schedule = "cosine" the remaining steps follow the curve of the new length); the log keys only
# change what is printed. Anything else would make the resumed run a different run.
RESUME_MAY_DIFFER = ("train.steps", "log.progress", "log.every", "log.tensorboard")


def sample_seed(run_seed: int, step: int, index: int) -> int:
    """Seed of a prompt's group: a pure function of (run seed, step, global prompt index).

    62 bits, so that seed + j (sample j of the group, vLLM's convention) cannot overflow.
    """
    h = hashlib.blake2b(f"{run_seed}/{step}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 2


def lr_at(cfg: config.Config, step: int) -> float:
    """Learning rate at a global step: each phase warms up linearly, then constant or cosine."""
    t = cfg.train
    if step < t.ntp_steps:
        peak, i, n = t.ntp_lr, step, t.ntp_steps
    else:
        peak, i, n = t.lr, step - t.ntp_steps, t.steps
    if i < t.warmup_steps:
        return peak * (i + 1) / (t.warmup_steps + 1)
    if t.schedule == "cosine":
        frac = (i - t.warmup_steps) / max(1, n - t.warmup_steps)
        return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
    return peak


@dataclass
class Group:
    prompt: Prompt
    completions: list  # rollout.Completion
    rewards: torch.Tensor  # [G]
    advantages: torch.Tensor  # [G]
    all_equal: bool


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
    own_engine = engine is None
    if own_engine:
        r = cfg.rollout
        with quiet_startup(cfg.log.verbose):  # vLLM's start-up chatter, unless log.verbose
            engine = make_engine(r.engine, model_dir, dtype=dtype, device=d.device, seed=t.seed,
                                 max_model_len=r.max_model_len, gpu_memory_utilization=r.gpu_memory_utilization,
                                 cpu_kv_cache_gib=r.cpu_kv_cache_gib, sleep_level=r.sleep_level,
                                 sync_bucket_mb=r.sync_bucket_mb, enforce_eager=r.enforce_eager,
                                 trust_remote_code=cfg.model.trust_remote_code)
    torch.manual_seed(t.seed)  # after the engine: vLLM reseeds the global RNG when it starts
    attn = resolve_attn(cfg.model.attn, d.device, dtype)

    def policy_from(path: str, frozen: bool) -> PolicyLogprob:
        # the frozen reference needs no masters: it is loaded in the compute dtype
        lm = load_policy(path, dtype=dtype if frozen else master, attn=attn,
                         trust_remote_code=cfg.model.trust_remote_code,
                         gradient_checkpointing=cfg.model.gradient_checkpointing and not frozen).to(d.device)
        return distributed.shard(PolicyLogprob(lm, cfg.model.logprob, cfg.model.lm_head_fp32), lm.model.layers, d,
                                 compute_dtype=None if frozen else dtype)

    policy = policy_from(model_dir, frozen=False)
    ref = None
    if cfg.algorithm.kl_coef > 0:
        ref = policy_from(model_dir, frozen=True).requires_grad_(False).eval()
    optimizer = make_optimizer(policy, cfg)
    logger = MetricsLogger(run_dir, d.main, t.ntp_steps + t.steps, cfg.log.progress, cfg.log.tensorboard,
                           cfg.log.every, wandb=cfg.log.wandb, trackio=cfg.log.trackio, project=cfg.log.project,
                           run_config=config.flat(cfg))
    if t.share_prompts and t.packing == "packed" and not shares_prompts(policy.lm):
        logger.write(f"note: train.share_prompts runs unshared with model.attn = {cfg.model.attn!r} "
                     f"({policy.lm.config._attn_implementation}); per_seq on the CPU and sdpa share prompts")
    for warning in config.warnings_for(cfg):
        logger.write(f"WARNING {warning}")
    task = make_task(cfg, tokenizer, t.seed)
    n_params = sum(p.numel() for p in policy.parameters())  # DTensor.numel() is the global size
    final_dtype = native_dtype(model_dir, cfg.model.trust_remote_code) if t.final_dtype == "model" else torch.float32
    run = Run(cfg, d, run_dir, tokenizer, task, policy, ref, optimizer, engine, logger,
              n_params=n_params, own_engine=own_engine, final_dtype=final_dtype)
    start = 0
    if resume:
        ckpt = checkpoint.latest(run_dir, say=logger.write, main=d.main)
        if ckpt is None:
            raise RunDirError(f"--resume: no intact checkpoint in {str(run_dir / 'checkpoints')!r}; start a new "
                              f"run (without --resume: the directory is reused)")
        state = checkpoint.load(ckpt, policy.lm, optimizer, d)
        start, run.cursor = state["step"], state["cursor"]
        if start > t.ntp_steps + t.steps:
            raise RunDirError(f"--resume: the checkpoint is at step {start}, past train.ntp_steps + train.steps "
                              f"= {t.ntp_steps + t.steps}; raise train.steps to extend the run")
        logger.write(f"resumed from {ckpt} at step {start}")
    logger.restart_at(start)  # rows a killed run logged after its checkpoint are redone, not duplicated
    return run, start


def make_optimizer(policy: torch.nn.Module, cfg: config.Config) -> torch.optim.Optimizer:
    t = cfg.train
    return torch.optim.AdamW(policy.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)


def train(cfg: config.Config, resume: bool = False, engine=None) -> Path:
    """Run both phases; return the directory of the final HF model.

    `engine` lets a caller reuse a started engine (tests, notebooks): its weights are
    replaced by the policy's at the start, so it may hold anything of the same shape.
    """
    lock = lock_run_dir(Path(cfg.train.out_dir)) if int(os.environ.get("RANK", "0")) == 0 else None
    try:
        run, start = build(cfg, resume, engine)
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    t = cfg.train
    total = t.ntp_steps + t.steps
    skipped_in_a_row = 0
    try:
        if start < t.ntp_steps:
            run.engine.sleep()  # phase 1 does not generate, except for evaluations
        else:
            sync(run)
        if start == 0:
            evaluate(run, 0)
        for step in range(start, total):
            if step == t.ntp_steps and step > 0:
                run.optimizer = make_optimizer(run.policy, cfg)  # phase 2 starts with fresh moments
                run.logger.write(f"phase 2: RL from the pre-trained weights at step {step}")
            metrics = ntp_step(run, step) if step < t.ntp_steps else rl_step(run, step)
            done = step + 1
            if t.eval_every and done % t.eval_every == 0 or done == total or done == t.ntp_steps:
                metrics.update(evaluate(run, done))
            run.logger.log(done, metrics)
            skipped_in_a_row = skipped_in_a_row + 1 if metrics.get("skipped") else 0
            if skipped_in_a_row >= t.max_skipped:
                raise NonFiniteError(f"{skipped_in_a_row} updates in a row skipped for non-finite loss or gradient "
                                     f"(train.max_skipped = {t.max_skipped}) at step {done}; lower train.lr or "
                                     f"check the data, then --resume from the last checkpoint")
            if t.ckpt_every and done % t.ckpt_every == 0 or done == total:
                checkpoint.save(run.run_dir, done, run.policy.lm, run.optimizer,
                                {"cursor": run.cursor}, run.d, t.keep_ckpts)
        final = checkpoint.save_hf(run.run_dir / "final", run.policy.lm, run.tokenizer, run.d, run.final_dtype)
        run.logger.write(f"done: final model in {final}")
        if run.d.main and hasattr(run.task, "report"):
            run.logger.write(run.task.report(run.run_dir, t.ntp_steps))
        return final
    finally:
        run.logger.close()
        if lock is not None:
            lock.close()
        if run.d.world > 1:
            # vLLM's shutdown tears down torch.distributed too, so it goes first; in a single
            # process it is left to exit, since it would also break other engines in the process
            if run.own_engine and hasattr(run.engine, "close"):
                run.engine.close()
            distributed.shutdown()


# ---------------------------------------------------------------- colocation


def _storages(tensors) -> list[torch.UntypedStorage]:
    """The distinct storages behind `tensors` (a DTensor's: its local shard's), 0-dim tensors left out."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            s = (t._local_tensor if hasattr(t, "_local_tensor") else t).untyped_storage()
            if s.nbytes():
                seen.setdefault(s.data_ptr(), s)
    return list(seen.values())


def offload(tensors) -> list[tuple[torch.UntypedStorage, torch.UntypedStorage]]:
    """Copies each storage behind `tensors` to host memory (pinned where CUDA is), then frees it in place.

    In place, storage by storage (resize to 0), as FSDP2 frees unsharded parameters: the tensors the
    optimizer and the model hold stay the same objects, DTensors included (whose ops have no sharding
    rule for is_pinned, so a DTensor cannot be moved with .to().pin_memory()). Returns what restore needs.
    """
    pin = torch.cuda.is_available()
    stash = []
    for s in _storages(tensors):
        host = torch.UntypedStorage(s.nbytes(), device="cpu")
        host = host.pin_memory() if pin else host
        host.copy_(s, non_blocking=pin)
        stash.append((s, host))
    if pin:
        torch.cuda.synchronize()
    for s, _ in stash:
        s.resize_(0)
    return stash


def restore(stash: list[tuple[torch.UntypedStorage, torch.UntypedStorage]]) -> None:
    """Undoes offload: each storage regrown on its device and filled from its host copy."""
    for s, host in stash:
        s.resize_(host.nbytes())
        s.copy_(host, non_blocking=True)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def trainer_out(run: Run) -> None:
    """Before the engine runs: optimizer state (and, if configured, weights) to pinned CPU memory."""
    if run.d.device.type != "cuda":
        return  # on the CPU there is nowhere else to put them
    if run.cfg.train.offload_optimizer:
        run.offloaded = offload(_optimizer_tensors(run.optimizer))
    if run.cfg.train.offload_weights:  # plain tensors only (no FSDP: build() says so); sync reads them on the host
        for p in run.policy.parameters():
            p.data = p.data.to("cpu", non_blocking=True).pin_memory()
    torch.cuda.empty_cache()


def trainer_in(run: Run) -> None:
    """After the engine sleeps: optimizer state (and weights) back on the device."""
    if run.d.device.type != "cuda":
        return
    if run.cfg.train.offload_weights:
        for p in run.policy.parameters():
            p.data = p.data.to(run.d.device, non_blocking=True)
    restore(run.offloaded)
    run.offloaded = []


def sync(run: Run) -> None:
    """New weights into the engine, a bucket at a time (it wakes its weights first, its KV cache after).

    Each master shard is cast to the engine's dtype before it is gathered: the engine gets bf16
    from fp32 masters, one tensor at a time.
    """
    run.engine.update_weights(full_tensors(run.policy.lm, getattr(run.engine, "dtype", None)))


# ---------------------------------------------------------------- phase 2: RL


def rl_step(run: Run, step: int) -> dict:
    """One GRPO step; the order of sleep, wake and sync is all here."""
    timer = Timer(run.d.device)
    t0 = time.perf_counter()
    groups, stats = rollout(run, step, timer)  # engine awake, trainer out
    with timer("sleep"):
        run.engine.sleep()
        trainer_in(run)
    # every rank joins the update when any rank kept a group (FSDP's collectives must pair up)
    # no group kept (dynamic sampling dropped every all-equal group): nothing to learn from, not a numeric
    # fault, so it does not count towards train.max_skipped
    metrics = update(run, groups, step, timer) if stats["groups_kept"] else {"skipped": 0, "skip_reason": "all_equal"}
    with timer("offload"):
        trainer_out(run)
    with timer("sync"):
        sync(run)  # the engine wakes here
    metrics.update(stats)
    return finish_metrics(run, metrics, timer, t0, step)


def rollout(run: Run, step: int, timer: Timer) -> tuple[list[Group], dict]:
    """Generate and score until the batch holds prompts_per_step useful groups (or tries run out).

    Without dynamic sampling, one try and every group is kept. With it, groups whose
    rewards are all equal (zero advantage, zero gradient) are dropped and the next
    prompts are drawn; across ranks, the first groups by global prompt index are kept,
    so the selection does not depend on the number of ranks.
    """
    cfg, d = run.cfg, run.d
    P, n = cfg.train.prompts_per_step, cfg.rollout.n
    per_rank = P // d.world
    sampling = SamplingConfig(cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.max_tokens)
    dynamic = cfg.algorithm.dynamic_sampling and step - cfg.train.ntp_steps >= cfg.algorithm.dynamic_sampling_from
    kept: list[Group] = []
    n_kept, tries = 0, cfg.algorithm.dynamic_sampling_tries if dynamic else 1
    rewards_all, lengths, truncated, equal = [], [], 0, 0
    for _ in range(tries):
        with timer("generate"):
            prompts = run.task.prompts(run.cursor + d.rank * per_rank, per_rank)
            run.cursor += P
            seeds = [sample_seed(cfg.train.seed, step, p.index) for p in prompts]
            comps = run.engine.generate([p.token_ids for p in prompts], n, sampling, seeds)
            check_finite_outputs(comps, f"rollout of step {step + 1}")
        with timer("reward"):
            rewards = torch.tensor([run.task.score(prompts[c.prompt_index], c.token_ids) for c in comps])
            adv, all_equal = group_advantages(rewards, n, scale=cfg.algorithm.adv_scale, eps=cfg.algorithm.adv_eps)
            groups = [Group(p, comps[i * n:(i + 1) * n], rewards[i * n:(i + 1) * n], adv[i * n:(i + 1) * n],
                            bool(all_equal[i])) for i, p in enumerate(prompts)]
            rewards_all.append(rewards)
            lengths += [len(c.token_ids) for c in comps]
            truncated += sum(c.finish_reason == "length" for c in comps)
            equal += int(all_equal.sum())
            if not dynamic:
                kept = groups
                break
            useful = [g for g in groups if not g.all_equal]
            everyone = sorted(i for idx in all_gather_objects([g.prompt.index for g in useful], d) for i in idx)
            take = set(everyone[:P - n_kept])
            kept += [g for g in useful if g.prompt.index in take]
            n_kept += len(take)
            if n_kept >= P:
                break
    with timer("reward"):
        r = torch.cat(rewards_all)
        s_r, s_acc, s_n, s_len, s_trunc, s_eq, s_groups = all_sum(
            [r.sum().item(), (r >= 1).sum().item(), r.numel(), sum(lengths), truncated, equal,
             len(rewards_all) * per_rank], d)
        (max_len,) = all_max([max(lengths)], d)
        stats = {"reward": s_r / s_n, "accuracy": s_acc / s_n, "response_len": s_len / s_n,
                 "response_len_max": max_len, "truncated_frac": s_trunc / s_n, "all_equal_frac": s_eq / s_groups,
                 "groups_kept": all_sum([len(kept)], d)[0], "generated_tokens": s_len}
    return kept, stats


def sequences(groups: list[Group]) -> list[Sequence]:
    return [Sequence(g.prompt.token_ids + c.token_ids, len(g.prompt.token_ids), float(a), c.logprobs)
            for g in groups for c, a in zip(g.completions, g.advantages)]


def aligned_micro_batches(run: Run, seqs: list[Sequence]) -> list[MicroBatch]:
    """Packed micro-batches; every rank runs the same number (FSDP's collectives pair up), so a
    rank with fewer pads with a masked-out dummy that contributes nothing.

    With train.share_prompts (and a backend that runs the shared mask), sequences with the same
    prompt share it: prompt-once rows (model.pack_shared), the same log-probs and gradients.
    """
    padded = run.cfg.train.packing == "padded"
    budget = run.cfg.train.micro_batch_tokens
    if run.cfg.train.share_prompts and not padded and shares_prompts(run.policy.lm):
        bins = pack_shared(seqs, budget) if seqs else []
        mbs = [collate_shared(seqs, b, run.d.device) for b in bins]
    else:
        bins = pack(seqs, budget, padded) if seqs else []
        mbs = [collate(seqs, b, run.d.device, padded=padded) for b in bins]
    (most,) = all_max([len(bins)], run.d)
    dummy = Sequence([0, 0], 1, 0.0, [0.0])
    while len(mbs) < most:
        mbs.append(collate([dummy], [0], run.d.device, masked=True))
    return mbs


def update(run: Run, groups: list[Group], step: int, timer: Timer) -> dict:
    """Mini-batch updates on the kept groups with the clipped policy loss."""
    cfg, d, a = run.cfg, run.d, run.cfg.algorithm
    T = cfg.rollout.temperature
    K = a.updates_per_batch
    with timer("pack"):
        seqs = sequences(groups)
        minis = [seqs[i::K] for i in range(K)] if K > 1 else [seqs]
        mbs_per_mini = [aligned_micro_batches(run, m) for m in minis]
        rates = flop_rates(run.policy.lm)
        fwd_flops = sum(forward_flops(rates, mb) for mbs in mbs_per_mini for mb in mbs)
    # old (and reference) log-probs, when they cannot come from the training forward itself
    old: dict[tuple[int, int], torch.Tensor] = {}
    ref: dict[tuple[int, int], torch.Tensor] = {}
    mismatch_sum = mismatch_max = mismatch_n = 0.0
    prepass_tokens = 0
    need_old = a.old_logprobs == "recompute" and K > 1
    if need_old or run.ref is not None:
        with timer("logprobs"), torch.no_grad():
            for i, mbs in enumerate(mbs_per_mini):
                for j, mb in enumerate(mbs):
                    if need_old:
                        old[i, j] = run.policy(mb, T)[0]
                        prepass_tokens += mb.n_tokens
                    if run.ref is not None:
                        ref[i, j] = run.ref(mb, T)[0]
                        prepass_tokens += mb.n_tokens
    # on-policy batches get the loss and its gradient in the lm_head pass (linear_policy_loss): one matmul less
    fused = cfg.model.fused_loss and cfg.model.logprob == "fused" and K == 1
    sums: dict[str, float] = {}
    skipped, trained_tokens, grad_norm, loss_total = 0, 0, 0.0, 0.0
    with timer("update"):
        for i, mbs in enumerate(mbs_per_mini):
            for g in run.optimizer.param_groups:
                g["lr"] = lr_at(cfg, step)
            mini = minis[i]
            norm_tokens, norm_seqs = all_sum([sum(s.n_scored for s in mini), len(mini)], d)
            normalizer = norm_tokens if a.aggregation == "token-mean" else norm_seqs
            mini_loss = 0.0
            for j, mb in enumerate(mbs):
                options = dict(eps_low=a.eps_low, eps_high=a.eps_high, dual_clip=a.dual_clip or None,
                               ref_logprobs=ref.get((i, j)), kl_coef=a.kl_coef,
                               rollout_logprobs=mb.rollout_logprobs if a.tis_cap else None, tis_cap=a.tis_cap or None,
                               aggregation=a.aggregation, seq_ids=mb.seq_ids, normalizer=normalizer,
                               max_len=cfg.rollout.max_tokens)
                if fused:  # old log-probs: the engine's, or (None) this forward's own
                    old_lp = mb.rollout_logprobs if a.old_logprobs == "rollout" else None
                    loss, m, logp, ent = run.policy(mb, T, loss=dict(
                        old_logprobs=old_lp, advantages=mb.advantages, mask=mb.mask,
                        grad_filter=cfg.model.grad_filter, **options))
                else:
                    logp, ent = run.policy(mb, T)
                # rollout vs trainer on the same tokens, with the weights the rollout used: the
                # pre-pass values, or this forward while no mini-batch has updated the weights yet
                before = old.get((i, j), logp.detach() if i == 0 else None)
                if before is not None:
                    diff = (before - mb.rollout_logprobs).abs()[mb.mask]
                    if diff.numel():
                        mismatch_sum += diff.sum().item()
                        mismatch_max = max(mismatch_max, diff.max().item())
                        mismatch_n += diff.numel()
                if not fused:
                    old_lp = mb.rollout_logprobs if a.old_logprobs == "rollout" else old.get((i, j), logp.detach())
                    loss, m = policy_loss(logp, old_lp, mb.advantages, mb.mask, **options)
                # FSDP averages gradients over ranks; the loss is already normalised by the global
                # count, so scale by the world size to get the gradient of the global sum.
                (loss * d.world).backward()
                mini_loss += loss.item()
                trained_tokens += mb.n_tokens
                n_tok = int(mb.mask.sum())
                _accumulate(sums, {**m, "entropy": ent.detach()[mb.mask].float().mean() if n_tok else 0.0}, n_tok)
            (mini_loss,) = all_sum([mini_loss], d)
            norm = _clip_grad(run, cfg.train.grad_clip)
            if not (math.isfinite(mini_loss) and math.isfinite(norm)):
                skipped += 1
                run.optimizer.zero_grad(set_to_none=True)
                run.logger.write(f"WARNING step {step + 1}: non-finite loss ({mini_loss}) or grad norm ({norm}); "
                                 f"update skipped, weights untouched")
                continue
            run.optimizer.step()
            check_finite_state(run, step)
            run.optimizer.zero_grad(set_to_none=True)
            loss_total += mini_loss
            grad_norm = max(grad_norm, norm)
    with timer("update"):  # the metrics' reductions are collectives: they belong to the phase
        totals = dict(zip(sums, all_sum(list(sums.values()), d)))
        n_tok = totals.pop("_n", 0) or 1
        metrics = {k: v / n_tok for k, v in totals.items()}
        m_sum, m_n = all_sum([mismatch_sum, mismatch_n], d)
        (m_max,) = all_max([mismatch_max], d)
        metrics.update({"loss": loss_total / max(1, K - skipped), "grad_norm": grad_norm, "lr": lr_at(cfg, step),
                        "skipped": skipped, "mismatch_mean": m_sum / max(1, m_n), "mismatch_max": m_max,
                        "trained_tokens": all_sum([trained_tokens], d)[0],
                        "prepass_tokens": all_sum([prepass_tokens], d)[0]})
        adv = torch.cat([g.advantages for g in groups]) if groups else torch.zeros(0)
        a_n, a_sum, a_sq, a_abs = all_sum([adv.numel(), adv.sum().item(), adv.square().sum().item(),
                                           adv.abs().sum().item()], d)
        a_mean = a_sum / max(a_n, 1)
        metrics.update({"adv_mean": a_mean, "adv_std": max(a_sq / max(a_n, 1) - a_mean**2, 0.0) ** 0.5,
                        "adv_abs_mean": a_abs / max(a_n, 1)})
        # counted FLOPs (model.flop_rates): forward + backward of every micro-batch, forward only per pre-pass
        n_prepasses = int(need_old) + int(run.ref is not None)
        metrics["flops/update"], metrics["flops/logprobs"] = all_sum([3 * fwd_flops, n_prepasses * fwd_flops], d)
        # the kept groups' prompts (each once) and completions: prompt-once packing trains P + sum R tokens per
        # group where the unshared one trains G P + sum R
        metrics["prompt_tokens"], metrics["completion_tokens"] = all_sum(
            [sum(len(g.prompt.token_ids) for g in groups), sum(s.n_scored for s in seqs)], d)
    if m_max > a.mismatch_warn:
        run.logger.write(f"WARNING step {step + 1}: rollout vs trainer logprob mismatch max {m_max:.3g} > "
                         f"algorithm.mismatch_warn = {a.mismatch_warn} (mean {m_sum / max(1, m_n):.3g}); "
                         f"the engine and the trainer disagree on the policy")
    # Far above numerical noise (fp32 ~1e-7, bf16 ~1e-3..1e-2 per token), the engine samples from another
    # policy. top_p < 1 adds at most -ln(top_p): the engine renormalises over a nucleus of mass >= top_p.
    limit = a.mismatch_stop - math.log(cfg.rollout.top_p)
    if m_sum / max(1, m_n) > limit:
        raise TrainingStopped(
            f"step {step + 1}: mean rollout vs trainer logprob mismatch {m_sum / max(1, m_n):.3g} per token "
            f"(max {m_max:.3g}) > {limit:.3g} (algorithm.mismatch_stop = {a.mismatch_stop}); the engine samples "
            f"from other weights than the trainer's. Likely causes: stale weights after a wake, a sync that "
            f"skipped a tensor, corrupted buffers (e.g. rotary caches after a level-2 sleep), a dtype mismatch "
            f"between engine and trainer. Nothing was saved for this step; raise algorithm.mismatch_stop only if "
            f"the gap is expected")
    return metrics


def _accumulate(sums: dict, m: dict, weight: int) -> None:
    """Token-weighted sums of per-micro-batch means, reduced over ranks later."""
    for k, v in m.items():
        sums[k] = sums.get(k, 0.0) + float(v) * weight
    sums["_n"] = sums.get("_n", 0.0) + weight


def check_finite_state(run: Run, step: int) -> None:
    """After an optimizer step: stop if any parameter or optimizer moment is non-finite.

    One fused reduction (torch._foreach_norm: a norm per tensor, one stack, one isfinite) over
    the local shards, and one collective. A norm that overflows float32 (entries near 1e19)
    counts as non-finite too: such weights are already broken. On failure the run stops
    (NonFiniteError, exit 3) instead of rolling back: a rollback needs a pre-step copy of the
    weights and both Adam moments (3x the fp32 parameters, 12 bytes per parameter, 168 GB for a
    14B model), while the last checkpoint is already a rollback point on disk, and the step that
    broke the weights from finite, clipped gradients would break them again on the same data.
    """
    tensors = [p.detach() for p in run.policy.parameters()]
    tensors += [v for st in run.optimizer.state.values() for v in st.values()
                if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0]
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    finite = bool(torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(local)])).all())
    (bad,) = all_max([0 if finite else 1], run.d)
    if bad:
        raise NonFiniteError(f"the update of step {step + 1} made weights or optimizer state non-finite "
                             f"(train.lr = {run.cfg.train.lr:g}); nothing was saved from it: lower the learning "
                             f"rate and --resume from the last checkpoint (or, with none, start again)")


def check_finite_outputs(comps: list, what: str) -> None:
    """A policy whose log-probs are non-finite produced non-finite logits: its samples are not
    answers, and scoring them (token 0 scored as right) would report a broken model as perfect."""
    bad = sum(not all(map(math.isfinite, c.logprobs)) for c in comps)
    if bad:
        raise NonFiniteError(f"{what}: {bad} of {len(comps)} completions have non-finite log-probs: the policy "
                             f"in the engine is broken (non-finite logits); lower train.lr and --resume from the "
                             f"last checkpoint")


class _CheckedOutputs:
    """The engine as a task's evaluation sees it: every completion checked by check_finite_outputs."""

    def __init__(self, engine, what: str):
        self.engine, self.what = engine, what

    def generate(self, *args, **kwargs):
        comps = self.engine.generate(*args, **kwargs)
        check_finite_outputs(comps, self.what)
        return comps


def _clip_grad(run: Run, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(run.policy.parameters(), max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


# ---------------------------------------------------------------- phase 1: next-token pre-training


def ntp_step(run: Run, step: int) -> dict:
    """Next-token loss on the task's (prompt, target) sequences: target tokens only, mean per token."""
    cfg, d = run.cfg, run.d
    timer = Timer(d.device)
    t0 = time.perf_counter()
    N = cfg.train.ntp_sequences
    per_rank = N // d.world
    with timer("pack"):
        pairs = run.task.pretrain_samples(run.cursor + d.rank * per_rank, per_rank)
        run.cursor += N
        seqs = [Sequence(p + y, len(p)) for p, y in pairs]
        mbs = aligned_micro_batches(run, seqs)
        (n_targets,) = all_sum([sum(s.n_scored for s in seqs)], d)
    for g in run.optimizer.param_groups:
        g["lr"] = lr_at(cfg, step)
    total, trained = 0.0, 0
    with timer("update"):
        for mb in mbs:
            logp, _ = run.policy(mb, 1.0)
            loss = -(logp * mb.mask).sum() / n_targets
            (loss * d.world).backward()
            total += loss.item()
            trained += mb.n_tokens
        (total,) = all_sum([total], d)
        norm = _clip_grad(run, cfg.train.grad_clip)
        skipped = not (math.isfinite(total) and math.isfinite(norm))
        if skipped:
            run.logger.write(f"WARNING step {step + 1}: non-finite loss or grad norm; update skipped")
        else:
            run.optimizer.step()
            check_finite_state(run, step)
        run.optimizer.zero_grad(set_to_none=True)
    metrics = {"phase": "ntp", "loss": total, "grad_norm": norm, "lr": lr_at(cfg, step), "skipped": int(skipped),
               "trained_tokens": all_sum([trained], d)[0], "prepass_tokens": 0}
    return finish_metrics(run, metrics, timer, t0, step)


# ---------------------------------------------------------------- evaluation and metrics


def evaluate(run: Run, step: int) -> dict:
    """The task's own evaluation through the engine (synced first when phase 1 keeps it asleep)."""
    cfg = run.cfg
    asleep_phase = step <= cfg.train.ntp_steps and cfg.train.ntp_steps > 0
    if asleep_phase:
        trainer_out(run)
        sync(run)
    out = run.task.evaluate(_CheckedOutputs(run.engine, f"evaluation at step {step}"), cfg.train.eval_prompts,
                            cfg.train.seed)
    if asleep_phase and step < cfg.train.ntp_steps:
        run.engine.sleep()
        trainer_in(run)
    metrics = {f"eval/{k}": v for k, v in out.items()}
    if step == 0:
        run.logger.log(0, {"phase": "init", **metrics})
    return metrics


def finish_metrics(run: Run, metrics: dict, timer: Timer, t0: float, step: int) -> dict:
    dt = time.perf_counter() - t0
    times = timer.times
    metrics.setdefault("phase", "rl")
    metrics["time/step"] = dt
    for k, v in times.items():
        metrics[f"time/{k}"] = v
        metrics[f"peak_mem_gb/{k}"] = timer.peaks[k]
    trained = metrics.get("trained_tokens", 0)
    metrics["tok_per_s"] = trained / dt
    if "generated_tokens" in metrics and times.get("generate"):
        metrics["tok_per_s/generate"] = metrics["generated_tokens"] / times["generate"]
    if times.get("update"):
        metrics["tok_per_s/update"] = trained / times["update"]
    if times.get("logprobs"):
        metrics["tok_per_s/logprobs"] = metrics["prepass_tokens"] / times["logprobs"]
    metrics["peak_mem_gb"] = max(timer.peaks.values(), default=peak_memory_gb(run.d.device))
    peak = peak_flops(run.d.device)
    busy = times.get("update", 0.0) + times.get("logprobs", 0.0)
    if peak and busy:
        flops = 6 * run.n_params * trained + 2 * run.n_params * metrics.get("prepass_tokens", 0)
        metrics["mfu"] = flops / (busy * peak * run.d.world)
    metrics["cursor"] = run.cursor
    return metrics
