"""The training loop: a next-token phase (optional), then GRPO, one step at a time.

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

import os
import time
from pathlib import Path

from rptfast import checkpoint, config, distributed
from rptfast.errors import DiskFullError, NonFiniteError, TrainingStopped
from rptfast.export import export
from rptfast.metrics import Timer
from rptfast.model import lora
from rptfast.train import info_gain
from rptfast.train.colocate import sync, trainer_in, trainer_out
from rptfast.train.groups import rollout
from rptfast.train.guards import CheckedOutputs
from rptfast.train.ntp import ntp_step
from rptfast.train.optimize import update
from rptfast.train.run import Run, build, lock_run_dir, make_optimizer
from rptfast.train.step_metrics import finish_metrics


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
        last = checkpoint.latest(run.run_dir, check=False)  # resumed from (verified in build), or None
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
                last = checkpoint.save(run.run_dir, done, run.policy.lm, run.optimizer, {"cursor": run.cursor},
                                       run.d, t.keep_ckpts, ema=None if run.ema is None else run.ema.lm,
                                       tokenizer=run.tokenizer)
        final = run.run_dir / "final"
        if lora.is_lora(run.policy.lm):  # peft's adapter folder (+ merged/), from the adapters every rank holds
            checkpoint.save_lora(final, run.policy.lm, run.tokenizer, run.d, run.final_dtype, cfg.model.lora_merged)
        else:  # one process, one output file's worth of tensors at a time (rptfast/export.py)
            distributed.on_main(run.d, lambda: export(last, final, run.final_dtype))
        run.logger.write(f"done: final model in {final}")
        if run.d.main and hasattr(run.task, "report"):
            run.logger.write(run.task.report(run.run_dir, t.ntp_steps))
        return final
    except DiskFullError as e:
        kept = checkpoint.latest(run.run_dir, check=False)
        raise TrainingStopped(f"{e}; the last complete checkpoint ({kept or 'none yet'}) is intact: --resume "
                              f"continues from it") from None
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


def rl_step(run: Run, step: int) -> dict:
    """One GRPO step; the order of sleep, wake and sync is all here."""
    timer = Timer(run.d.device)
    t0 = time.perf_counter()
    groups, stats = rollout(run, step, timer)  # engine awake, trainer out
    with timer("sleep"):
        run.engine.sleep()
        trainer_in(run)
    if run.ema is not None:  # info_gain: scored by the trainer's forwards, so after the engine sleeps
        with timer("reward"):
            stats.update(info_gain.rescore(run, groups))
    # every rank joins the update when any rank kept a group (FSDP's collectives must pair up)
    # no group kept (dynamic sampling dropped every all-equal group): nothing to learn from, not a numeric
    # fault, so it does not count towards train.max_skipped
    metrics = update(run, groups, step, timer) if stats["groups_kept"] else {"skipped": 0, "skip_reason": "all_equal"}
    with timer("offload"):
        trainer_out(run)
    with timer("sync"):
        metrics["sync_mb"] = sync(run) / 2**20  # the engine wakes here
    metrics.update(stats)
    return finish_metrics(run, metrics, timer, t0, step)


def evaluate(run: Run, step: int) -> dict:
    """The task's own evaluation through the engine (synced first when phase 1 keeps it asleep)."""
    cfg = run.cfg
    asleep_phase = step <= cfg.train.ntp_steps and cfg.train.ntp_steps > 0
    if asleep_phase:
        trainer_out(run)
        sync(run)
    out = run.task.evaluate(CheckedOutputs(run.engine, f"evaluation at step {step}"), cfg.train.eval_prompts,
                            cfg.train.seed)
    if asleep_phase and step < cfg.train.ntp_steps:
        run.engine.sleep()
        trainer_in(run)
    metrics = {f"eval/{k}": v for k, v in out.items()}
    if step == 0:
        run.logger.log(0, {"phase": "init", **metrics})
    return metrics
