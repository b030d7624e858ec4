"""Thoughts inline in the raw text (data.template = "inline", RLP's format `x_<t <think> c </think> x_t`) on a base
model that has no chat template: the reward on the continuation after the close (bytes written down by hand), the
prompts, the transparent-thought warm-up's sequences (what is inserted, what is scored), the packed forward of
sequences that score a tail of their completion or skip inserted spans (against a plain fp64 HF forward), the
information-gain reward's prompt-once scoring, the four evaluation modes, and a warm-up followed by RL with a
budget schedule through the trainer."""

import json
import shutil

import numpy as np
import pytest
import torch
from rpt_corpus import prepare_config, write_corpus
from transformers import AutoModelForCausalLM, AutoTokenizer

from rptfast import cli, config
from rptfast import train as trainer
from rptfast.config import ConfigError
from rptfast.data.prepare import prepare
from rptfast.data.store import SampleStore
from rptfast.data.templates import PromptBuilder
from rptfast.data.tokens import token_bytes
from rptfast.eval import run_eval
from rptfast.metrics import Timer
from rptfast.model import Sequence, collate, collate_shared, hidden_states, load_policy, resolve_attn
from rptfast.reward import inline_reward
from rptfast.rollout import SamplingConfig, sample_seed
from rptfast.rollout.torch_engine import TorchEngine
from rptfast.tasks.rpt import RPTTask

OPEN, CLOSE = "<reason>", "</reason>"  # not tokens of the tiny vocabulary: each marker is several tokens
PROMPT, MAX_TOKENS = 64, 12


@pytest.fixture(scope="module")
def base_dir(tiny_dir, tmp_path_factory):
    """The tiny model as a base model: the same weights and tokenizer, no chat template."""
    out = tmp_path_factory.mktemp("base") / "model"
    shutil.copytree(tiny_dir, out)
    cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(tok_cfg))
    (out / "chat_template.jinja").unlink(missing_ok=True)
    assert not getattr(AutoTokenizer.from_pretrained(out), "chat_template", None)
    return str(out)


@pytest.fixture(scope="module")
def store(base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("inline")
    paths, _, _ = write_corpus(root / "corpus")
    prepare(prepare_config(max_positions_per_doc=4, eval_fraction=0.25), paths, base_dir, str(root / "store"))
    return str(root / "store")


@pytest.fixture(scope="module")
def tok(base_dir):
    return AutoTokenizer.from_pretrained(base_dir)


def make_cfg(base_dir, store, out, **sections):
    tree = {
        "model": {"path": base_dir},
        "data": {"task": "rpt", "samples": store, "template": "inline", "max_prompt_tokens": PROMPT,
                 "think_open": OPEN, "think_close": CLOSE, "rpt_ntp": "thoughts"},
        "rollout": {"engine": "torch", "n": 4, "max_tokens": MAX_TOKENS, "max_model_len": 128},
        "train": {"steps": 2, "prompts_per_step": 3, "micro_batch_tokens": 256, "lr": 1e-3, "out_dir": str(out),
                  "eval_prompts": 4, "ntp_sequences": 4, "seed": 3},
        "eval": {"k": 2, "samples": 6},
        "log": {"progress": False, "tensorboard": False},
    }
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    return config.from_dict(tree)


def test_inline_reward_by_hand():
    """The prediction is the continuation after the close, cut at the first of the model's own token ends that
    covers the first true token; Eq. 3 on those bytes."""
    table = [b"</r>", b" para", b"meter", b" p", b"ara", b" parameter", b" paragraph", b"x", b"</", b"r>", b"r> para",
             b"<eos>"]
    ids = {piece: i for i, piece in enumerate(table)}
    truth, bounds = b" parameter is", [5, 10, 13]  # tokens " para", "meter", " is"

    def score(*pieces, mode="prefix"):
        return inline_reward([ids[p] for p in pieces], table, b"</r>", ids[b"<eos>"], truth, bounds, mode)

    assert score(b"x", b"</r>", b" para", b"x") == (1.0, 3)  # the first true token; what follows is not trained
    assert score(b"</r>", b" p", b"ara") == (1.0, 3)  # spelt in two tokens: it ends on the boundary
    assert score(b"</r>", b" parameter", b"x") == (1.0, 2)  # two true tokens in one: a longer prefix
    assert score(b"</r>", b" paragraph") == (0.0, 2)  # its first bytes match, but the token says something else
    assert score(b"</", b"r> para", b"x") == (1.0, 2)  # a token straddles the close: counted from the close on
    assert score(b"</r>", b" para", mode="first_token") == (1.0, 2)
    assert score(b"</r>", b" parameter", mode="first_token") == (0.0, 2)  # exactly the first token, no more
    assert score(b"x", b" para") == (0.0, 2)  # never closed: no answer, the whole completion trained
    assert score(b"x", b"</r>", b" p", b"<eos>") == (0.0, 4)  # EOS before the first true token is covered
    assert score(b"</r>", b"x", b" para") == (0.0, 3)  # "x" is short of the first boundary: "x para", wrong


def closes(s: Sequence, close: list[int]) -> set[int]:
    """Positions of the scored closes' tokens in a warm-up sequence: right after a thought's unscored part, when
    that part is followed by the close (after an empty thought the close is unscored, part of it)."""
    skip, n = set(s.skip), len(close)
    return {k + i for k in range(1, len(s.tokens)) if k - 1 in skip and k not in skip
            and s.tokens[k:k + n] == close for i in range(n)}


def test_prompts_score_and_warmup_on_a_base_model(base_dir, store, tok, tmp_path):
    with pytest.raises(ConfigError, match="no chat template"):
        PromptBuilder(tok, "v0", PROMPT, token_bytes(tok))
    with pytest.raises(ConfigError, match="data.template = 'inline'"):
        make_cfg(base_dir, store, tmp_path / "x", data={"template": "think"}, train={"ntp_steps": 1})
    cfg = make_cfg(base_dir, store, tmp_path / "run", data={"thought_hint": 0.5, "thought_spans": 3})
    task = RPTTask(tok, cfg.data, cfg.rollout, seed=0)
    open_ids, close_ids = tok.encode(OPEN), tok.encode(CLOSE)
    assert len(open_ids) > 1 and len(close_ids) > 1
    hinted = spans_seen = 0
    for p, s in zip(task.prompts(0, 40), task.pretrain_samples(0, 40)):
        context, truth = p.meta["context_ids"], p.meta["truth_ids"]
        assert p.token_ids == context + open_ids and p.meta["context_span"] == (0, len(context))
        thought = tok.encode(" so")
        assert task.score(p, thought + close_ids + truth) == 1.0
        assert task.trained_length(p, thought + close_ids + truth + [7]) == len(thought + close_ids) + 1
        assert task.score(p, thought + close_ids + [(truth[0] + 1) % 500] + truth) == 0.0
        assert task.score(p, thought + truth) == 0.0 and task.trained_length(p, thought + truth) == len(thought + truth)
        # the warm-up: the text with thoughts inserted; the text is scored, every token after the first, and the
        # closes' tokens (data.thought_close); the openers and the thoughts' content are not
        assert [t for k, t in enumerate(s.tokens) if k not in s.skip and k not in closes(s, close_ids)] ==\
            context + truth
        j, n_spans, text_at = 1, 0, 1  # s.tokens[j] is text[text_at] unless a thought starts there
        while j < len(s.tokens):
            if j not in s.skip:
                j, text_at = j + 1, text_at + 1
                continue
            assert s.tokens[j:j + len(open_ids)] == open_ids
            end = next(k for k in range(j + len(open_ids), len(s.tokens))
                       if s.tokens[k:k + len(close_ids)] == close_ids)
            hint = s.tokens[j + len(open_ids):end]
            assert len(hint) <= 3 and hint == (context + truth)[text_at:text_at + len(hint)]  # the next true tokens
            assert all(k in s.skip for k in range(j, end))
            # the close is scored after a thought with content, not after an empty one (which would teach the
            # model to close every thought at once)
            assert (set(range(end, end + len(close_ids))) <= set(s.skip)) == (not hint)
            hinted += bool(hint)
            n_spans += 1
            spans_seen += text_at == len(context)  # the sample's own position always gets a thought
            j = end + len(close_ids)
            assert j not in s.skip  # the text token right after a close is scored
        assert n_spans == 3 and s.scored == [k for k in range(1, len(s.tokens)) if k not in s.skip]
    assert spans_seen == 40 and 0.3 < hinted / 120 < 0.7  # a share of 0.5 over 120 spans: sd ~0.05


def test_warmup_with_the_models_own_thoughts(base_dir, store, tok, tmp_path):
    """data.thought_sampled: the thoughts are what the engine samples after the text so far and the opener (cut at
    the close, EOS dropped), drawn again here from the same engine and seeds; the text around them is intact."""
    cfg = make_cfg(base_dir, store, tmp_path / "run", data={"thought_hint": 0.0, "thought_sampled": 1.0,
                                                          "thought_spans": 2})
    task = RPTTask(tok, cfg.data, cfg.rollout, seed=0)
    engine = TorchEngine(base_dir, dtype=torch.float32, device=torch.device("cpu"), max_model_len=128)
    open_ids, close_ids = tok.encode(OPEN), tok.encode(CLOSE)
    with pytest.raises(ValueError, match="needs the rollout engine"):
        task.pretrain_samples(0, 2)
    sampling = SamplingConfig(cfg.rollout.temperature, cfg.rollout.top_p, MAX_TOKENS)
    non_empty = 0
    for p, s in zip(task.prompts(0, 3), task.pretrain_samples(0, 3, engine)):
        text = p.meta["context_ids"] + p.meta["truth_ids"]
        assert [t for j, t in enumerate(s.tokens) if j not in s.skip and j not in closes(s, close_ids)] == text
        j, at = 1, 1  # s.tokens[j] is text[at] unless a span starts there
        while j < len(s.tokens):
            if j not in s.skip:
                j, at = j + 1, at + 1
                continue
            c = engine.generate([text[:at] + open_ids], 1, sampling, [sample_seed(0, "thought", p.index, at)])[0]
            thought = task.build.thought(c.token_ids, tok.eos_token_id)[0]
            assert s.tokens[j:j + len(open_ids) + len(thought) + len(close_ids)] == open_ids + thought + close_ids
            non_empty += bool(thought)
            j += len(open_ids) + len(thought) + len(close_ids)
    assert non_empty >= 5  # 6 thoughts of up to 12 sampled tokens from a random model: hardly ever empty


def test_packed_forward_scores_tails_and_skips_spans(base_dir):
    """Sequences that score a tail of the completion (prompt < start: the information-gain reward) or skip inserted
    spans (the warm-up), in plain and prompt-once rows, against a plain fp64 HF forward."""
    lm64 = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64)
    lm = load_policy(base_dir, dtype=torch.float64, attn=resolve_attn("auto", torch.device("cpu"), torch.float64),
                     trust_remote_code=False, gradient_checkpointing=False).eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 500, (13,), generator=g).tolist()
    seqs = [Sequence(prompt + torch.randint(0, 500, (n,), generator=g).tolist(), 13 + m, prompt=13)
            for n, m in ((7, 5), (4, 0), (9, 8))]
    seqs.append(Sequence(torch.randint(0, 500, (17,), generator=g).tolist(), 1, skip=(3, 4, 5, 11)))
    want = []
    for s in seqs:
        with torch.no_grad():
            logp = lm64(input_ids=torch.tensor([s.tokens])).logits[0].log_softmax(-1)
        want += [logp[j - 1, s.tokens[j]].item() for j in s.scored]
    assert len(want) == sum(s.n_scored for s in seqs) == 2 + 4 + 1 + 12
    for shared in (False, True):
        mb = (collate_shared if shared else collate)(seqs, list(range(len(seqs))), torch.device("cpu"))
        assert (mb.shared is not None) == shared
        assert mb.targets.tolist() == [s.tokens[j] for s in seqs for j in s.scored]
        with torch.no_grad():
            h = hidden_states(lm, mb)
            got = (h[mb.pred_idx] @ lm.get_output_embeddings().weight.T).log_softmax(-1).gather(
                -1, mb.targets[:, None])[:, 0]
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-10)
    # the prompt-once row holds the three sequences' prompt once
    assert collate_shared(seqs, [0, 1, 2], torch.device("cpu")).n_tokens == 13 + 7 + 4 + 9


def test_eval_reports_four_inline_modes(base_dir, store, tok, tmp_path, vllm_engine):
    """plain, empty, oracle and reasoning: the first three per sample against a plain fp64 HF forward; the engine
    (the tiny model's weights, which this base model shares) samples the thoughts."""
    cfg = make_cfg(base_dir, store, tmp_path / "run")
    out = tmp_path / "eval.json"
    result = run_eval(cfg, base_dir, store, str(out), engine=vllm_engine, progress=False)
    assert json.loads(out.read_text()) == result
    st = SampleStore(store)
    rows = result["per_sample"]["row"]
    build = PromptBuilder(tok, "inline", PROMPT, token_bytes(tok), OPEN, CLOSE)
    lm64 = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64)
    heads = {"plain": lambda c, t: c, "empty": lambda c, t: c + build.open + build.close,
             "oracle": lambda c, t: c + build.open + [t] + build.close}
    for i, r in enumerate(rows):
        s = st.get(r)
        c, t = build.context(s["context_ids"]), s["continuation_ids"][0]
        for mode, head in heads.items():
            with torch.no_grad():
                logits = lm64(input_ids=torch.tensor([head(c, t)])).logits[0, -1]
            key = "plain_logp" if mode == "plain" else f"{mode}_logp"
            assert result["per_sample"][key][i] == pytest.approx(logits.log_softmax(-1)[t].item(), abs=1e-4), mode
            assert result["per_sample"][mode][i] == float(logits.argmax() == t)
    for mode in ("plain", "empty", "oracle", "reasoning"):
        cell = result["inline"][mode]["all"]
        assert cell["samples"] == len(rows) and cell["logp"] < 0 and cell["logp_se"] > 0
        assert cell["logp"] == pytest.approx(np.mean(result["per_sample"][f"{mode}_logp"]), abs=1e-6)
    assert 0.0 <= result["answer_rate"] <= 1.0 and result["max_tokens"] == MAX_TOKENS
    # rptfast table puts the modes side by side: its cells are the evaluation's own
    assert cli.main(["table", "--eval", f"base={out}", "--data", store, "--out", str(tmp_path / "table")]) == 0
    rows_ = json.loads((tmp_path / "table" / "table.json").read_text())["rows"]
    assert [r["mode"] for r in rows_] == ["plain", "empty", "oracle", "reasoning", "random@1"]
    for r in rows_[:4]:
        assert r["accuracy"]["hard"] == pytest.approx(result["inline"][r["mode"]]["hard"]["accuracy"])
        assert r["logp"] == pytest.approx(result["inline"][r["mode"]]["all"]["logp"], abs=1e-5)
    # the command a user runs on any corpus and model: plain and the two fixed thoughts need no engine
    assert cli.main(["eval", "--model", base_dir, "--data", store, "--out", str(tmp_path / "cli.json"),
                     "--set", "data.template=inline", "--set", "eval.reasoning=false", "--set", "eval.samples=4",
                     "--set", "data.max_prompt_tokens=64"]) == 0
    assert set(json.loads((tmp_path / "cli.json").read_text())["inline"]) == {"plain", "empty", "oracle"}


def test_warmup_then_rl_with_a_budget_schedule(base_dir, store, tmp_path):
    """Two warm-up steps, then RLP inline with a linear budget: the budget starts at rollout.max_tokens on the
    first RL step, not on step 0 (budget_at counts RL steps after train.ntp_steps); then RPT inline trains on the
    thought and the prediction only."""
    engine = TorchEngine(base_dir, dtype=torch.float32, device=torch.device("cpu"), max_model_len=128)
    cfg = make_cfg(base_dir, store, tmp_path / "rlp", data={"reward": "info_gain"},
                   rollout={"budget_schedule": "linear", "max_tokens_end": 4},
                   train={"ntp_steps": 2, "steps": 3, "ntp_lr": 1e-3})
    trainer.train(cfg, engine=engine)
    rows = [json.loads(x) for x in (tmp_path / "rlp" / "metrics.jsonl").read_text().splitlines()]
    ntp = [r for r in rows if r.get("phase") == "ntp"]
    rl = [r for r in rows if r.get("phase") == "rl"]
    assert len(ntp) == 2 and all(np.isfinite(r["loss"]) and r["trained_tokens"] > 0 for r in ntp)
    assert [r["budget"] for r in rl] == [MAX_TOKENS, 8, 4]
    assert all(np.isfinite(r["info_gain"]) and r["thought_len"] <= r["budget"] for r in rl)

    rpt = make_cfg(base_dir, store, tmp_path / "rpt", data={"reward": "prefix"}, train={"steps": 1})
    run, _ = trainer.build(rpt, engine=engine)
    trainer.sync(run)
    groups, _ = trainer.rollout(run, 0, Timer(run.d.device))
    sampling = SamplingConfig(rpt.rollout.temperature, rpt.rollout.top_p, rpt.rollout.max_tokens)
    full = engine.generate([g.prompt.token_ids for g in groups], 4, sampling,
                           [sample_seed(3, 0, g.prompt.index) for g in groups])
    for c in full:
        g = groups[c.prompt_index]
        kept = g.completions[c.sample_index]
        n = run.task.trained_length(g.prompt, c.token_ids)
        assert kept.token_ids == c.token_ids[:n] and kept.logprobs == c.logprobs[:n]



def test_rlp_qwen3_base_preset_is_the_papers_setting():
    cfg = config.load("rlp-qwen3-1.7b-base")
    assert cfg.model.path == "Qwen/Qwen3-1.7B-Base" and cfg.data.template == "inline"
    assert (cfg.data.reward, cfg.rollout.n, cfg.train.lr, cfg.rollout.max_tokens) == ("info_gain", 16, 1e-6, 2048)
    assert cfg.data.rpt_ntp == "thoughts" and cfg.train.ntp_steps > 0 and cfg.prepare.min_entropy == 0.0
    assert cfg.data.max_prompt_tokens + cfg.rollout.max_tokens + cfg.data.info_gain_tokens < cfg.rollout.max_model_len
