"""The next-token phase (train.ntp_steps, before RL): the task's sequences (Task.pretrain_samples), their scored
tokens' loss, mean per token. Parity and the toy corpus pre-train from scratch here; RPT warms a real model up."""

from __future__ import annotations

import math
import time

from rptfast.distributed import all_sum
from rptfast.metrics import Timer
from rptfast.train.colocate import sync, trainer_in, trainer_out
from rptfast.train.guards import CheckedOutputs, check_finite_state
from rptfast.train.optimize import aligned_micro_batches, clip_grad
from rptfast.train.run import Run
from rptfast.train.schedule import lr_at
from rptfast.train.step_metrics import finish_metrics


def ntp_step(run: Run, step: int) -> dict:
    """Next-token loss on the task's sequences: their scored tokens, mean per token."""
    cfg, d = run.cfg, run.d
    timer = Timer(d.device)
    t0 = time.perf_counter()
    N = cfg.train.ntp_sequences
    per_rank = N // d.world
    if cfg.data.rpt_ntp == "thoughts" and cfg.data.thought_sampled and cfg.data.task == "rpt":
        with timer("generate"):  # the warm-up's own thoughts: the engine, woken with the current weights
            trainer_out(run)
            sync(run)
            seqs = run.task.pretrain_samples(run.cursor + d.rank * per_rank, per_rank, CheckedOutputs(
                run.engine, f"the warm-up's thoughts at step {step + 1}"))
            run.engine.sleep()
            trainer_in(run)
    else:
        with timer("pack"):
            seqs = run.task.pretrain_samples(run.cursor + d.rank * per_rank, per_rank)
    run.cursor += N
    with timer("pack"):
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
        norm = clip_grad(run, cfg.train.grad_clip)
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
