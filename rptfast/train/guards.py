"""Guards: a non-finite number or an engine that samples from other weights stops the run, never gets saved.

- check_finite_state: after every optimizer step, the weights and Adam moments (one fused reduction);
- check_finite_outputs: the engine's log-probs, before anything is scored;
- check_mismatch: the rollout's log-probs against the trainer's on the same tokens and weights.
"""

from __future__ import annotations

import math

import torch

from rptfast.distributed import all_max
from rptfast.errors import NonFiniteError, TrainingStopped
from rptfast.train.run import Run


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
    tensors = [p.detach() for p in run.policy.parameters() if p.requires_grad]  # a LoRA base never changes
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


class CheckedOutputs:
    """The engine as a task's evaluation sees it: every completion checked by check_finite_outputs."""

    def __init__(self, engine, what: str):
        self.engine, self.what = engine, what

    def generate(self, *args, **kwargs):
        comps = self.engine.generate(*args, **kwargs)
        check_finite_outputs(comps, self.what)
        return comps


def check_mismatch(run: Run, step: int, mean: float, worst: float) -> None:
    """Warn above algorithm.mismatch_warn (max per token); stop above algorithm.mismatch_stop (mean per token).

    Far above numerical noise (fp32 ~1e-7, bf16 ~1e-3..1e-2 per token), the engine samples from another
    policy. top_p < 1 adds at most -ln(top_p): the engine renormalises over a nucleus of mass >= top_p.
    """
    a = run.cfg.algorithm
    if worst > a.mismatch_warn:
        run.logger.write(f"WARNING step {step + 1}: rollout vs trainer logprob mismatch max {worst:.3g} > "
                         f"algorithm.mismatch_warn = {a.mismatch_warn} (mean {mean:.3g}); "
                         f"the engine and the trainer disagree on the policy")
    limit = a.mismatch_stop - math.log(run.cfg.rollout.top_p)
    if mean > limit:
        raise TrainingStopped(
            f"step {step + 1}: mean rollout vs trainer logprob mismatch {mean:.3g} per token "
            f"(max {worst:.3g}) > {limit:.3g} (algorithm.mismatch_stop = {a.mismatch_stop}); the engine samples "
            f"from other weights than the trainer's. Likely causes: stale weights after a wake, a sync that "
            f"skipped a tensor, corrupted buffers (e.g. rotary caches after a level-2 sleep), a dtype mismatch "
            f"between engine and trainer. Nothing was saved for this step; raise algorithm.mismatch_stop only if "
            f"the gap is expected")
