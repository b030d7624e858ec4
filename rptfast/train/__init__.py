"""The trainer, one file per stage of the loop (loop.py reads top to bottom):

- run.py: the run directory (claimed, locked, resumable) and everything a step needs, built once;
- loop.py: the step loop, one RL step (rollout, sleep, update, offload, sync), the evaluation hook;
- groups.py: the rollout: groups of completions from the engine, rewards, advantages, dynamic sampling;
- optimize.py: the update: micro-batches, the policy loss (fused or two-step), the optimizer step;
- info_gain.py: RLP's information-gain reward (data.reward = "info_gain") and its EMA baseline;
- ntp.py: the next-token phase before RL;
- colocate.py: the engine and the trainer sharing the device (offload, restore, sync);
- guards.py: non-finite numbers and engine/trainer mismatch stop the run;
- schedule.py: the learning rate and the thought budget over steps, the length term;
- step_metrics.py: the per-step log line.

The names the CLI, the benchmarks and the tests use are importable from here.
"""

from rptfast.train.colocate import offload, optimizer_tensors, restore, sync, sync_tensors, trainer_in, trainer_out
from rptfast.train.groups import Group, rollout, sample_seed
from rptfast.train.loop import evaluate, rl_step, train
from rptfast.train.ntp import ntp_step
from rptfast.train.optimize import aligned_micro_batches, sequences, update
from rptfast.train.run import Run, RunDirError, build, lock_run_dir, make_optimizer
from rptfast.train.schedule import lr_at

__all__ = [
    "Group", "Run", "RunDirError", "aligned_micro_batches", "build", "evaluate", "lock_run_dir", "lr_at",
    "make_optimizer", "ntp_step", "offload", "optimizer_tensors", "restore", "rl_step", "rollout", "sample_seed",
    "sequences", "sync", "sync_tensors", "train", "trainer_in", "trainer_out", "update",
]  # fmt: skip
