"""The trainer's GRPO step against a plain-torch GRPO written here, independently, in fp64.

A real TorchEngine samples completions of unequal lengths from weights slightly off the
policy's (so that the ratios to the rollout log-probs spread around 1 and the clip bites);
a task with hand-set rewards scores them; `trainer.rollout` and `trainer.update` run as in a
training step, and the gradient that reaches the optimizer is caught and compared.
"""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from rptfast import config
from rptfast import train as trainer
from rptfast.errors import TrainingStopped
from rptfast.metrics import Timer
from rptfast.rollout.torch_engine import TorchEngine
from rptfast.tasks import Prompt
from rptfast.testing import make_tiny_model

G = 4  # group size
T = 0.8  # temperature: the trainer and the reference both score softmax(logits / T)
EPS_LOW, EPS_HIGH, ADV_EPS = 0.2, 0.28, 1e-6
PROMPTS = [[1, 5, 9], [1, 7, 3, 12, 4, 8, 10], [1, 14, 6, 6, 11], [1, 9], [1, 4, 4, 13, 7, 5]]
# one list of G rewards per prompt, in sample order; the third group is all equal (advantage 0,
# its tokens still count in the token-mean normaliser), the others are neither 0/1 nor centred
REWARDS = [[1.0, 0.0, 0.0, 0.5], [0.2, 0.9, 0.9, 0.4], [0.7, 0.7, 0.7, 0.7], [0.0, 1.0, 1.0, 0.25],
           [0.3, 0.0, 0.6, 0.1]]


class HandSetRewards:
    """Prompts of unequal lengths; score() hands out REWARDS in the order the trainer asks."""

    name = "hand-set"

    def __init__(self, prompts=PROMPTS, rewards=REWARDS):
        self.token_ids, self.rewards = prompts, rewards
        self.queue: dict[int, list[float]] = {}

    def prompts(self, start: int, count: int) -> list[Prompt]:
        out = []
        for i in range(start, start + count):
            self.queue[i] = list(self.rewards[i % len(self.rewards)])
            out.append(Prompt(i, self.token_ids[i % len(self.token_ids)]))
        return out

    def score(self, prompt: Prompt, completion: list[int]) -> float:
        return self.queue[prompt.index].pop(0)


class GradCatcher(torch.optim.Optimizer):
    """An optimizer whose step records the gradients it is given and changes nothing."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.0})
        self.caught: list[dict[torch.nn.Parameter, torch.Tensor]] = []

    @torch.no_grad()
    def step(self):
        self.caught.append({p: p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None})


@pytest.fixture(scope="module")
def char_dir(tmp_path_factory):
    """A 1-layer model over a 24-token character vocabulary: EOS (1 in 24) ends completions at unequal lengths."""
    return str(make_tiny_model(tmp_path_factory.mktemp("grpo") / "m", vocab=24, layers=1, tokenizer="char",
                               init_std=0.2, seed=0))


def build_run(char_dir, out, **overrides):
    tree = {
        "model": {"path": char_dir},
        "data": {"task": "first_token"},
        "rollout": {"engine": "torch", "n": G, "temperature": T, "max_tokens": 12, "max_model_len": 64},
        # the engine's weights are off on purpose (mean mismatch ~1 nat): the stop threshold is raised
        "algorithm": {"eps_low": EPS_LOW, "eps_high": EPS_HIGH, "adv_eps": ADV_EPS, "old_logprobs": "rollout",
                      "aggregation": "token-mean", "adv_scale": "group", "mismatch_stop": 10.0},
        "train": {"steps": 1, "prompts_per_step": len(PROMPTS), "grad_clip": 0.0, "out_dir": str(out)},
        "log": {"progress": False, "tensorboard": False},
    }
    for key, value in overrides.items():
        section, name = key.split("__")
        tree.setdefault(section, {})[name] = value
    cfg = config.from_dict(tree)
    engine = TorchEngine(char_dir, dtype=torch.float32, device=torch.device("cpu"), max_model_len=64)
    g = torch.Generator().manual_seed(7)
    # the engine samples from weights a little off the policy's: ratios spread around 1
    engine.update_weights([(n, p + 0.03 * torch.randn(p.shape, generator=g))
                           for n, p in engine.model.state_dict().items()])
    run, _ = trainer.build(cfg, engine=engine)
    run.task = HandSetRewards()
    run.optimizer = GradCatcher(run.policy.parameters())
    return run


def reference_grads(char_dir, groups_tokens, rewards):
    """Plain GRPO in fp64: advantages (r - mean) / (unbiased std + eps) per group, the clipped
    surrogate against the rollout log-probs, summed over every completion token and divided
    by the number of completion tokens in the batch (token-mean)."""
    model = AutoModelForCausalLM.from_pretrained(char_dir, dtype=torch.float64)
    terms, n_tokens = [], 0
    for (prompt, completions), r in zip(groups_tokens, rewards):
        r = torch.tensor(r, dtype=torch.float64)
        adv = (r - r.mean()) / (r.std() + ADV_EPS)
        for (tokens, rollout_lp), a in zip(completions, adv):
            ids = torch.tensor([prompt + tokens])
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1] / T  # [C, V]
            lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]
            ratio = torch.exp(lp - torch.tensor(rollout_lp, dtype=torch.float64))
            terms.append(torch.minimum(ratio * a, ratio.clamp(1 - EPS_LOW, 1 + EPS_HIGH) * a).sum())
            n_tokens += len(tokens)
    loss = -torch.stack(terms).sum() / n_tokens
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("micro_batch_tokens", [4096, 32])
def test_update_gradient_equals_plain_grpo(char_dir, tmp_path, micro_batch_tokens):
    """At 4096 tokens the batch is one micro-batch, at 32 several of unequal token counts: the gradient is the
    same, normalised by the batch's completion tokens, not each micro-batch's."""
    run = build_run(char_dir, tmp_path / "run", train__micro_batch_tokens=micro_batch_tokens)
    timer = Timer(run.d.device)
    groups, _ = trainer.rollout(run, 0, timer)
    assert torch.equal(torch.stack([g.rewards for g in groups]), torch.tensor(REWARDS, dtype=torch.float32))
    n_mbs = len(trainer.aligned_micro_batches(run, trainer.sequences(groups)))
    assert n_mbs == 1 if micro_batch_tokens == 4096 else n_mbs >= 5
    # preconditions that give the comparison its teeth: lengths differ, and the clip bites on both sides
    assert len({len(c.token_ids) for g in groups for c in g.completions}) >= 4
    metrics = trainer.update(run, groups, 0, timer)
    assert metrics["clip_frac_low"] > 0.05 and metrics["clip_frac_high"] > 0.02
    (caught,) = run.optimizer.caught
    names = {p: n.removeprefix("lm.") for n, p in run.policy.named_parameters()}
    got = {names[p]: g for p, g in caught.items()}
    want = reference_grads(char_dir, [(g.prompt.token_ids, [(c.token_ids, c.logprobs) for c in g.completions])
                                      for g in groups], REWARDS)
    assert got.keys() == want.keys()
    # fp32 trainer vs fp64 reference: observed <= 3e-7 absolute on gradients up to 0.13; a mutant (raw rewards
    # as advantages, per-micro-batch normaliser) moves them by O(0.01 .. 0.1)
    for n in want:
        torch.testing.assert_close(got[n].double(), want[n], rtol=1e-4, atol=1e-6, msg=n)


def test_dynamic_sampling_keeps_no_all_equal_group(char_dir, tmp_path):
    """Groups whose rewards are all equal are dropped; the first useful groups by prompt index fill the batch."""
    rewards = [[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5],
               [1.0, 0.0, 1.0, 1.0]]
    run = build_run(char_dir, tmp_path / "run", algorithm__dynamic_sampling=True,
                    algorithm__dynamic_sampling_tries=3)
    run.task = HandSetRewards(rewards=rewards)
    groups, stats = trainer.rollout(run, 0, Timer(run.d.device))
    for g in groups:
        assert not g.all_equal and len(set(g.rewards.tolist())) > 1, g.prompt.index
    # 5 prompts per try, 2 useful each (indices 1 and 4 mod 5): 3 tries give 6, the first 5 are kept
    assert [g.prompt.index for g in groups] == [1, 4, 6, 9, 11]
    assert run.cursor == 15 and stats["groups_kept"] == 5 and stats["all_equal_frac"] == pytest.approx(9 / 15)


def test_mismatch_above_threshold_stops(char_dir, tmp_path):
    """An engine serving other weights (here ~1 nat per token off) stops the run with the likely causes named."""
    run = build_run(char_dir, tmp_path / "run", algorithm__mismatch_stop=0.1)
    timer = Timer(run.d.device)
    groups, _ = trainer.rollout(run, 0, timer)
    with pytest.raises(TrainingStopped, match=r"mismatch 1\.\d+ per token .* > 0\.1 .*stale weights after a "
                                                      r"wake, a sync that skipped a tensor, corrupted buffers"):
        trainer.update(run, groups, 0, timer)
    # top_p < 1 widens the threshold by -ln(top_p): the most a nucleus renormalisation can lift a log-prob
    run.cfg.rollout.top_p = 0.25
    assert trainer.update(run, groups, 0, timer)["mismatch_mean"] < 0.1 - math.log(0.25)
