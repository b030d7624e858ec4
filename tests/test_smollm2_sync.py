"""The weight sync on a real model: SmolLM2-135M-Instruct (llama, 30 layers, lm_head tied to the embedding), fp32.

Two real trainer steps (`trainer.rl_step`: vLLM rollout, clipped policy loss, AdamW at lr 1e-4, sync into the
in-process vLLM engine); after each sync the engine's sampled-token log-probs are held to an fp64 forward of the
trainer's current weights. The checks have teeth: the engine's log-probs move between syncs by far more than the
tolerance, and an engine that kept the pre-update output layer (the tied lm_head, which vLLM's CPU backend holds as
a packed copy of the embedding that a reload by name never touches) would be off by far more too.
"""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from rptfast import config
from rptfast import train as trainer
from rptfast.rollout import SamplingConfig
from rptfast.rollout.vllm_engine import VLLMEngine
from rptfast.tasks import Prompt

TEXTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,"]
N, T, LR = 4, 0.9, 1e-4
# fp32 engine vs an fp64 HF forward, 30 layers, vocab 49152, 96 tokens per sync: measured max 3.3e-5 .. 5.1e-5,
# mean 0.7e-5 .. 0.9e-5; the fp32 HF forward's own error against fp64 on such tokens is max 1.3e-5 .. 2.9e-5, mean
# 2e-6 .. 3.5e-6, so the engine's error is 2-3x fp32's own. The bounds leave 4x for other CPUs' GEMM rounding.
# What they must catch, measured: a sync that kept the old output layer is off by 4e-2 .. 1e-1 max (mean 7e-3 ..
# 1.1e-2; with the tied lm_head's re-packing in VLLMEngine.update_weights removed, this test fails at sync 1 with
# 8.6e-2), and one step at lr 1e-4 moves the engine's log-probs by 0.7 .. 1.8 max.
TOL, MEAN_TOL = 2e-4, 4e-5


class AlternatingRewards:
    """Fixed text prompts; rewards 1, 0, 1, 0 within every group, so every step has a gradient to follow."""

    name = "alternating"

    def __init__(self, prompts: list[list[int]]):
        self.token_ids = prompts
        self.count = 0

    def prompts(self, start: int, count: int) -> list[Prompt]:
        return [Prompt(i, self.token_ids[i % len(self.token_ids)]) for i in range(start, start + count)]

    def score(self, prompt: Prompt, completion: list[int]) -> float:
        self.count += 1
        return float(self.count % 2)


@pytest.fixture(scope="session")
def smollm2_vllm(smollm2_dir):
    """An in-process vLLM engine on SmolLM2 (~10 s). Session-scoped, like test_engines.py's second engine: an
    engine released mid-session would tear down the process-global groups that the others need."""
    return VLLMEngine(smollm2_dir, dtype=torch.float32, seed=0, max_model_len=128)


@torch.no_grad()
def fp64_logprobs(model, prompt: list[int], completion: list[int], heads: list[torch.Tensor]) -> list[torch.Tensor]:
    """fp64 log p(completion[t] | prompt, completion[:t]) under softmax(h W^T / T), h the final hidden states of
    an HF forward, one result per output layer W in `heads`."""
    ids = torch.tensor([prompt + completion])
    h = model.model(input_ids=ids).last_hidden_state[0, len(prompt) - 1:-1]  # [C, H]
    tok = torch.tensor(completion)[:, None]
    return [torch.log_softmax(h @ w.double().T / T, -1).gather(-1, tok)[:, 0] for w in heads]


def common_prefix_diffs(before, after) -> list[float]:
    """|after - before| engine log-probs of the same seeded samples, over the tokens both runs sampled alike."""
    diffs = []
    for b, a in zip(before, after):
        same = next((i for i, (x, y) in enumerate(zip(b.token_ids, a.token_ids)) if x != y),
                    min(len(b.token_ids), len(a.token_ids)))
        diffs += [abs(x - y) for x, y in zip(b.logprobs[:same], a.logprobs[:same])]
    return diffs


def test_two_updates_synced_into_vllm_match_fp64(smollm2_dir, smollm2_vllm, tmp_path):
    cfg = config.from_dict({
        "model": {"path": smollm2_dir},
        "data": {"task": "first_token"},  # replaced below by AlternatingRewards
        "rollout": {"engine": "vllm", "n": N, "temperature": T, "max_tokens": 8, "max_model_len": 128},
        "train": {"steps": 2, "prompts_per_step": 2, "lr": LR, "out_dir": str(tmp_path / "run")},
        "log": {"progress": False, "tensorboard": False},
    })
    run, _ = trainer.build(cfg, engine=smollm2_vllm)
    lm = run.policy.lm
    prompts = [run.tokenizer(t).input_ids for t in TEXTS]
    run.task = AlternatingRewards(prompts)
    # the case this test is about: one matrix is both the trainer's embedding and its output layer, and vLLM
    # holds a tied lm_head that rptfast re-packs after each sync
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight and smollm2_vllm.tied
    trainer.sync(run)  # the session's engine may hold weights from an earlier test
    ref = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(smollm2_dir), dtype=torch.float64,
                                           attn_implementation="eager").eval()
    probe = SamplingConfig(temperature=T, max_tokens=8)
    seeds = [11, 12, 13]
    before = smollm2_vllm.generate(prompts, N, probe, seeds=seeds)
    for step in range(2):
        head_before = lm.get_output_embeddings().weight.detach().clone()  # [V, H]
        metrics = trainer.rl_step(run, step)  # rollout, update, sync
        assert metrics["skipped"] == 0 and metrics["grad_norm"] > 0
        # the trainer's own guard (the rollout of this step against the trainer's fp32 forward) agrees
        assert metrics["mismatch_max"] <= TOL
        head = lm.get_output_embeddings().weight.detach()
        assert (head - head_before).abs().max() > LR / 2  # AdamW moved the tied matrix by ~lr per entry

        after = smollm2_vllm.generate(prompts, N, probe, seeds=seeds)
        ref.load_state_dict({k: v.detach().double() for k, v in lm.state_dict().items()})
        err, stale = [], []
        for c in after:
            fresh, old_head = fp64_logprobs(ref, prompts[c.prompt_index], c.token_ids, [ref.lm_head.weight,
                                                                                       head_before])
            got = torch.tensor(c.logprobs, dtype=torch.float64)
            err.append((got - fresh).abs())
            stale.append((got - old_head).abs())
        err, stale = torch.cat(err), torch.cat(stale)
        moved = common_prefix_diffs(before, after)
        print(f"sync {step + 1}: engine vs fp64 max {err.max():.2e} mean {err.mean():.2e} over {len(err)} tokens; "
              f"vs a stale lm_head max {stale.max():.2e} mean {stale.mean():.2e}; moved since the last sync max "
              f"{max(moved):.2e} over {len(moved)} tokens; trainer mismatch max {metrics['mismatch_max']:.2e}")
        assert err.max() <= TOL and err.mean() <= MEAN_TOL
        assert stale.max() > 100 * TOL  # an engine serving the pre-update output layer would fail the line above
        assert len(moved) >= 8 and max(moved) > 100 * TOL  # the sync changed what the engine computes
        before = after
