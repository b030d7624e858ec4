"""RPT's successors in the same trainer, each against an independent reference: RLP's information-gain reward
(a plain fp64 HF computation of both log-probs), its EMA baseline (the formula, and an exact resume), the thought
budget and the length term (values written down by hand), and the RL + next-token mix (the gradient of the sum
is the sum of the gradients, the next-token part from a plain fp64 HF forward)."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from rpt_corpus import prepare_config, write_corpus
from transformers import AutoModelForCausalLM, AutoTokenizer

from rptfast import checkpoint, config
from rptfast import train as trainer
from rptfast.config import ConfigError
from rptfast.data.prepare import prepare
from rptfast.metrics import Timer
from rptfast.rollout.torch_engine import TorchEngine
from rptfast.testing import make_tiny_model
from rptfast.train import info_gain
from rptfast.train.optimize import micro_batch_loss
from rptfast.train.schedule import budget_at, length_penalty

PROMPT, MAX_TOKENS = 96, 16


@pytest.fixture(scope="module")
def store(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    paths, _, _ = write_corpus(root / "corpus")
    prepare(prepare_config(max_positions_per_doc=3, eval_fraction=0.0), paths, tiny_dir, str(root / "store"))
    return str(root / "store")


def make_cfg(tiny_dir, store, out, **sections):
    tree = {
        "model": {"path": tiny_dir},
        "data": {"task": "rpt", "samples": store, "template": "bare", "max_prompt_tokens": PROMPT,
                 "reward": "info_gain", "info_gain_tokens": 2},
        "rollout": {"engine": "torch", "n": 4, "max_tokens": MAX_TOKENS, "max_model_len": 256, "temperature": 1.0},
        "train": {"steps": 2, "prompts_per_step": 3, "micro_batch_tokens": 160, "lr": 1e-3, "out_dir": str(out),
                  "eval_prompts": 2, "seed": 3},
        "log": {"progress": False, "tensorboard": False},
    }
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    return config.from_dict(tree)


def build(cfg, tiny_dir):
    engine = TorchEngine(tiny_dir, dtype=torch.float32, device=torch.device("cpu"), max_model_len=256)
    run, _ = trainer.build(cfg, engine=engine)
    trainer.sync(run)
    return run


@torch.no_grad()
def hf_logprob(model, ids: list[int], start: int) -> float:
    """fp64 sum of log p(ids[t] | ids[:t]) for t >= start, from a plain HF forward."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, start - 1:-1].double()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[start:])[:, None]).sum().item()


@pytest.mark.parametrize("template, share", [("bare", True), ("bare", False), ("inline", True)])
def test_info_gain_equals_a_plain_fp64_computation(tiny_dir, store, tmp_path, template, share):
    """Closed, unclosed and EOS-ended thoughts; the baseline from EMA weights that differ from the policy's; the
    policy's scoring in prompt-once rows (each group's prompt once) and unshared; the chat format (the truth after
    `</think>\\boxed{`) and the inline one (the truth right after the close)."""
    run = build(make_cfg(tiny_dir, store, tmp_path / "run", data={"template": template},
                         train={"share_prompts": share}), tiny_dir)
    other = make_tiny_model(tmp_path / "other", "qwen3", vocab=512, layers=2, seed=5)  # the EMA: other weights
    with torch.no_grad():
        for p, q in zip(run.ema.parameters(), AutoModelForCausalLM.from_pretrained(other).parameters()):
            p.copy_(q)
    groups, _ = trainer.rollout(run, 0, Timer(run.d.device))
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    close, answer = (tok.encode(x, add_special_tokens=False) for x in ("</think>", "\\boxed{"))
    answer = [] if template == "inline" else answer
    assert close == [tok.convert_tokens_to_ids("</think>")]  # one special token in this tokenizer
    for g in groups:  # every kind of thought: closed in the middle, unclosed, ended by EOS without a close
        for j, c in enumerate(g.completions):
            ids = list(c.token_ids[:MAX_TOKENS - 2])
            ids = {0: ids[:3] + close + ids[3:], 1: ids, 2: ids + [tok.eos_token_id], 3: close + ids}[j]
            g.completions[j] = dataclasses.replace(c, token_ids=ids, logprobs=[-1.0] * len(ids))
    before = [[list(c.token_ids) for c in g.completions] for g in groups]
    stats = info_gain.rescore(run, groups)

    policy64 = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64)
    ema64 = AutoModelForCausalLM.from_pretrained(other, dtype=torch.float64)
    gains = []
    for g, comps in zip(groups, before):
        truth, context = g.prompt.meta["truth_ids"][:2], g.prompt.meta["context_ids"]
        assert len(truth) == 2 and g.prompt.token_ids[slice(*g.prompt.meta["context_span"])] == context
        baseline = hf_logprob(ema64, context + truth, len(context))
        want = []
        for ids in comps:
            cut = ids.index(close[0]) + 1 if close[0] in ids else None
            thought = ids[:cut] if cut else [t for t in ids if t != tok.eos_token_id] + close
            head = g.prompt.token_ids + thought + answer
            want.append(hf_logprob(policy64, head + truth, len(head)) - baseline)
        gains += want
        # fp32 trainer (fused log-prob kernel) vs fp64: sums of two log-probs of ~-6 agree to ~1e-5
        torch.testing.assert_close(g.rewards.double(), torch.tensor(want, dtype=torch.float64), rtol=0, atol=2e-4)
        r = torch.tensor(want)
        torch.testing.assert_close(g.advantages, (r - r.mean()) / (r.std() + 1e-6), rtol=0, atol=1e-4)
        # only the thought is trained on: cut after the close, unclosed ones kept whole
        assert [c.token_ids for c in g.completions] == [ids[:ids.index(close[0]) + 1] if close[0] in ids else ids
                                                        for ids in comps]
    assert stats["info_gain"] == pytest.approx(sum(gains) / len(gains), abs=2e-4)
    assert stats["all_equal_frac"] == 0.0  # gains differ within every group (the prefix rewards mostly did not)


def test_ema_follows_the_policy_and_resumes_exactly(tiny_dir, store, tmp_path):
    """phi_k = d phi_(k-1) + (1 - d) theta_k after each optimizer step (fp32, against the fp64 formula); a run
    stopped after its step-1 checkpoint and resumed ends with the same EMA and policy, bit for bit."""
    decay = 0.75
    whole = make_cfg(tiny_dir, store, tmp_path / "whole", algorithm={"ema_decay": decay},
                     train={"ckpt_every": 1, "keep_ckpts": 3})
    run = build(dataclasses.replace(whole, train=dataclasses.replace(whole.train, out_dir=str(tmp_path / "steps"))),
                tiny_dir)
    phi = [p.detach().double().clone() for p in run.ema.parameters()]
    for step in range(2):
        trainer.rl_step(run, step)
        phi = [decay * e + (1 - decay) * p.detach().double() for e, p in zip(phi, run.policy.parameters())]
        for want, got in zip(phi, run.ema.parameters()):
            torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
    assert max((a - p.detach().double()).abs().max().item() for a, p in zip(phi, run.policy.parameters())) > 1e-4

    trainer.train(whole, engine=TorchEngine(tiny_dir, dtype=torch.float32, device=torch.device("cpu"),
                                            max_model_len=256))
    short = dataclasses.replace(whole, train=dataclasses.replace(whole.train, steps=1, out_dir=str(tmp_path / "cut")))
    trainer.train(short, engine=TorchEngine(tiny_dir, dtype=torch.float32, device=torch.device("cpu"),
                                            max_model_len=256))
    longer = dataclasses.replace(short, train=dataclasses.replace(short.train, steps=2))
    trainer.train(longer, resume=True, engine=TorchEngine(tiny_dir, dtype=torch.float32, device=torch.device("cpu"),
                                                           max_model_len=256))
    def tensors(run: str, step: int, prefix: str) -> dict:
        ckpt = tmp_path / run / "checkpoints" / f"step_{step:06d}"
        return checkpoint.read(ckpt, checkpoint.keys(ckpt, prefix))

    for prefix in ("ema.", "model."):
        a, b = tensors("whole", 2, prefix), tensors("cut", 2, prefix)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), prefix
    first, last = tensors("whole", 1, "ema."), tensors("whole", 2, "ema.")
    assert any(not torch.equal(first[k], last[k]) for k in first)  # the EMA moved between the two checkpoints


def test_ema_under_mixed_precision(tiny_dir, store, tmp_path):
    """bf16 compute over fp32 masters (FSDP2's mixed precision, here on one process): the EMA's scoring forward has no
    backward, which leaves the root's parameters unsharded in bf16; the average is still taken over the fp32 masters
    (the default on GPUs, where this crashed at the first RLP step)."""
    decay = 0.5
    cfg = make_cfg(tiny_dir, store, tmp_path / "run", model={"dtype": "bfloat16"}, algorithm={"ema_decay": decay},
                   train={"steps": 1})
    engine = TorchEngine(tiny_dir, dtype=torch.bfloat16, device=torch.device("cpu"), max_model_len=256)
    run, _ = trainer.build(cfg, engine=engine)
    trainer.sync(run)
    full = lambda p: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().double()  # noqa: E731
    phi = [full(p) for p in run.ema.parameters()]
    trainer.rl_step(run, 0)
    for e, p, before in zip(run.ema.parameters(), run.policy.parameters(), phi):
        assert e.dtype == torch.float32 and p.dtype == torch.float32
        torch.testing.assert_close(full(e), decay * before + (1 - decay) * full(p), rtol=0, atol=1e-6)
    assert any(not torch.equal(full(e), b) for e, b in zip(run.ema.parameters(), phi))


def test_budget_schedules_and_length_term_by_hand():
    def cfg(schedule, end, **kw):
        return config.from_dict({"model": {"path": "m"}, "data": {"task": "first_token"}, "rollout": {
            "max_tokens": 64, "budget_schedule": schedule, "max_tokens_end": end},
            "train": {"steps": 5, "ntp_steps": 0, "micro_batch_tokens": 128}, "algorithm": kw})

    assert [budget_at(cfg("constant", 0), s) for s in range(5)] == [64] * 5
    assert [budget_at(cfg("linear", 16), s) for s in range(5)] == [64, 52, 40, 28, 16]
    # 16 + 48 * (1 + cos(pi s / 4)) / 2: 64, 56.97, 40, 23.03, 16
    assert [budget_at(cfg("cosine", 16), s) for s in range(5)] == [64, 57, 40, 23, 16]
    c = cfg("constant", 0, length_coef=0.01, length_target=10)
    assert [length_penalty(c, n) for n in (0, 10, 11, 25)] == [0.0, 0.0, 0.01, pytest.approx(0.15)]
    for bad, match in (({"budget_schedule": "linear", "max_tokens_end": 0}, "must be in \\[1, 64\\]"),
                       ({"budget_schedule": "cosine", "max_tokens_end": 65}, "must be in \\[1, 64\\]"),
                       ({"max_tokens_end": 8}, "needs rollout.budget_schedule")):
        with pytest.raises(ConfigError, match=match):
            config.from_dict({"model": {"path": "m"}, "data": {"task": "first_token"},
                              "rollout": {"max_tokens": 64, **bad}})


def test_budget_and_length_term_in_a_run(tiny_dir, store, tmp_path):
    """The engine gets each step's budget (no completion longer), and the reward is the task's minus the term."""
    cfg = make_cfg(tiny_dir, store, tmp_path / "run", data={"reward": "prefix"},
                   rollout={"budget_schedule": "linear", "max_tokens_end": 4},
                   algorithm={"length_coef": 0.05, "length_target": 3}, train={"steps": 3})
    run = build(cfg, tiny_dir)
    for step, budget in enumerate((MAX_TOKENS, 10, 4)):
        groups, stats = trainer.rollout(run, step, Timer(run.d.device))
        lengths = [len(c.token_ids) for g in groups for c in g.completions]
        assert stats["budget"] == budget and max(lengths) <= budget and max(lengths) == budget
        for g in groups:
            task = torch.tensor([run.task.score(g.prompt, c.token_ids) for c in g.completions])
            term = torch.tensor([0.05 * max(0, len(c.token_ids) - 3) for c in g.completions])
            torch.testing.assert_close(g.rewards, task - term)
        assert stats["length_penalty"] == pytest.approx(sum(0.05 * max(0, n - 3) for n in lengths) / len(lengths))


@pytest.mark.parametrize("fused, share", [(True, True), (False, False), (True, False)])
def test_ntp_mix_gradient_is_the_sum_of_both_gradients(tiny_dir, store, tmp_path, fused, share):
    """grad(policy loss + c * NTP) = grad(policy loss) + c * grad(mean NLL of the prompts' context tokens, each
    prompt once), the last from a plain fp64 HF forward; shared and unshared packing, fused and two-step loss."""
    coef = 0.7
    cfg = make_cfg(tiny_dir, store, tmp_path / "run", data={"reward": "prefix"}, algorithm={"ntp_coef": coef},
                   model={"fused_loss": fused}, train={"share_prompts": share, "micro_batch_tokens": 160},
                   rollout={"temperature": 0.8})  # the policy loss at T = 0.8, the next-token loss at T = 1
    run = build(cfg, tiny_dir)
    groups, _ = trainer.rollout(run, 0, Timer(run.d.device))
    for g in groups:  # advantages that are not all zero, whatever the untrained model earned
        g.advantages = torch.linspace(-1.0, 1.0, len(g.completions))

    def grads(with_ntp: bool) -> dict[str, torch.Tensor]:
        run.cfg.algorithm.ntp_coef = coef if with_ntp else 0.0
        run.policy.zero_grad(set_to_none=True)
        seqs = trainer.sequences(groups, ntp=with_ntp)
        n_tok = sum(s.n_scored for s in seqs)
        n_ctx = sum(s.context[1] - max(1, s.context[0]) for s in seqs if s.context)
        mbs = trainer.aligned_micro_batches(run, seqs)
        assert len(mbs) > 1 and (not with_ntp or any(mb.ntp_idx is not None for mb in mbs))
        for mb in mbs:
            loss, m, _, _ = micro_batch_loss(run, mb, n_tok, None, None, fused, n_ctx)
            loss.backward()
        return {n.removeprefix("lm."): p.grad.double().clone() for n, p in run.policy.named_parameters()}

    mixed, policy_only = grads(True), grads(False)
    lm = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64)
    nll, count = 0.0, 0
    for g in groups:
        a, b = g.prompt.meta["context_span"]
        ids = g.prompt.token_ids
        logits = lm(input_ids=torch.tensor([ids])).logits[0].double()
        lp = torch.log_softmax(logits[max(1, a) - 1:b - 1], -1).gather(-1, torch.tensor(ids[max(1, a):b])[:, None])
        nll = nll - lp.sum()
        count += b - max(1, a)
    (nll / count).backward()
    ntp = {n: p.grad for n, p in lm.named_parameters()}
    assert mixed.keys() == policy_only.keys() <= ntp.keys()
    for n in mixed:
        want = policy_only[n] + coef * ntp[n]
        # fp32 (the trainer) vs fp64: a tenth of a percent of the largest gradient, far below a mix scored at
        # the wrong positions, at the rollout temperature, or missing a prompt
        assert (mixed[n] - want).abs().max() <= 1e-3 * want.abs().max() + 1e-6, n
    assert max((coef * ntp[n]).abs().max().item() for n in mixed) > 1e-2  # the NTP part is not negligible


def test_info_gain_run_logs_its_metrics_and_refuses_what_cannot_run(tiny_dir, store, tmp_path):
    trainer.train(make_cfg(tiny_dir, store, tmp_path / "run"),
                  engine=TorchEngine(tiny_dir, dtype=torch.float32, device=torch.device("cpu"), max_model_len=256))
    rows = [json.loads(x) for x in (Path(tmp_path) / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("phase") == "rl"]
    assert len(steps) == 2
    for r in steps:
        assert math.isfinite(r["info_gain"]) and r["logp_think"] < 0 and r["logp_nothink"] < 0
        assert r["info_gain"] == pytest.approx(r["logp_think"] - r["logp_nothink"], abs=1e-6)
        assert 0 < r["thought_len"] <= MAX_TOKENS and 0.0 <= r["accuracy"] <= 1.0 and r["budget"] == MAX_TOKENS
        assert r["all_equal_frac"] == 0.0  # of the information gains, not of the prefix rewards they replace
    for bad, match in (({"data": {"task": "first_token"}}, "needs data.task = 'rpt'"),
                       ({"algorithm": {"dynamic_sampling": True}}, "never are"),
                       ({"train": {"master_dtype": "bfloat16"}}, "fp32 masters"),
                       ({"train": {"micro_batch_tokens": PROMPT + MAX_TOKENS}}, "information-gain scoring")):
        with pytest.raises(ConfigError, match=match):
            make_cfg(tiny_dir, store, tmp_path / "x", **bad)
    with pytest.raises(ConfigError, match="only RPT prompts have"):
        config.from_dict({"model": {"path": "m"}, "data": {"task": "first_token"}, "algorithm": {"ntp_coef": 0.1}})
