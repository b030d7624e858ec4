"""The RPT toy (rptfast.tasks.toy): the corpus's entropy structure, the demonstrations, the tokenizer."""

import json
import math
from collections import Counter, defaultdict

import numpy as np
import pytest
from transformers import AutoTokenizer

from rptfast import config
from rptfast.data.templates import PromptBuilder
from rptfast.data.tokens import token_bytes
from rptfast.reward import reward
from rptfast.tasks import toy
from rptfast.testing import write_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy")
    write_tokenizer(path, "toy")
    return AutoTokenizer.from_pretrained(path)


def test_records_and_their_sums():
    for i in range(200):
        text = toy.document(3, i)
        lines = text.split("\n")
        assert toy.RECORDS[0] <= len(lines) <= toy.RECORDS[1]
        for line in lines:
            m, rest = line.split(":")
            digits, answer = rest.split("=")
            assert int(m) in toy.MODULI and len(digits) == toy.DIGITS
            assert all(int(c) < int(m) for c in digits)
            assert int(answer) == sum(map(int, digits)) % int(m)
    assert toy.document(3, 7) == toy.document(3, 7) != toy.document(4, 7)


def test_ground_truth_distributions_per_position_kind():
    """Empirical next-character distributions over 3000 documents, grouped by what `truth` says a
    position is: random positions are uniform with the stated entropy, reducible and fixed ones are
    determined by the context. A reducible answer, read without its digits, looks as random as a digit."""
    seen = defaultdict(Counter)  # (kind, stated entropy, a modulus?) -> next characters
    determined = defaultdict(set)  # (kind, context line) -> next characters
    for i in range(3000):
        text = toy.document(0, i)
        for pos, (kind, h) in enumerate(toy.truth(text), start=1):
            line = text[text.rfind("\n", 0, pos) + 1:pos]
            seen[kind, round(h, 3), line == ""][text[pos]] += 1
            if kind != "random":
                determined[kind, line].add(text[pos])
            assert toy.kind(text[:pos]) == ("reducible" if kind == "reducible" else "random") or kind == "fixed"
    for (kind, h, _), counts in seen.items():
        if kind != "random":
            continue
        p = np.array(list(counts.values())) / sum(counts.values())
        assert len(counts) == round(math.exp(h))  # uniform over m symbols: entropy ln m
        assert abs(-(p * np.log(p)).sum() - h) < 0.01  # ~10^4 draws per kind: sampling error ~1e-3
    assert {h for kind, h, _ in seen if kind == "random"} == {round(math.log(m), 3) for m in toy.MODULI}
    # fixed and reducible: one next character per context line (a line break or the end for the last)
    assert all(len(v) == 1 for (kind, line), v in determined.items() if kind == "reducible")
    assert all(v <= {":", "=", "\n"} for (kind, line), v in determined.items() if kind == "fixed" and
               not line.count("=") or v == {"\n"})
    # without its digits an answer is uniform below m, like the digits: the entropy a non-reasoning proxy sees
    for m in toy.MODULI:
        answers = Counter(s[-1] for i in range(2000) for s in toy.document(1, i).split("\n") if s[0] == str(m))
        p = np.array(list(answers.values())) / sum(answers.values())
        assert len(answers) == m and abs(-(p * np.log(p)).sum() - math.log(m)) < 0.02


def test_demonstrations_work_the_sum_out_and_earn_the_reward(tok):
    cfg = config.from_dict({"data": {"task": "toy", "template": "bare", "max_prompt_tokens": 136,
                                     "toy_demos": 0.5}, "rollout": {"max_tokens": 16},
                            "train": {"steps": 0, "ntp_steps": 1}})
    task = toy.ToyTask(tok, cfg.data, cfg.rollout, seed=2, sequences_per_step=8)
    build = PromptBuilder(tok, "bare", 136, token_bytes(tok))
    n_demo = n_reducible = 0
    pairs = [(q.tokens[:q.start], q.tokens[q.start:]) for q in task.pretrain_samples(0, 300)]
    for i, (prompt, target) in enumerate(pairs):
        text = toy.document(2, i)
        if prompt[:len(build.pre)] != build.pre:  # a plain document: its first token is the prompt
            assert tok.decode(prompt + target) == text and len(prompt) == 1
            continue
        n_demo += 1
        context = tok.decode(prompt[len(build.pre):-len(build.post)])
        assert text.startswith(context) and len(prompt) <= 136
        completion = tok.decode(target, skip_special_tokens=False)
        nxt = text[len(context)]
        # the completion scored as RPT scores it: the next character, boxed after the thought
        assert reward(completion, text[len(context):].encode(), [1]) == 1.0
        work = completion[:completion.index("</think>")]
        if toy.kind(context) == "reducible":
            n_reducible += 1
            line = context[context.rfind("\n") + 1:]
            m = int(line[0])
            assert work == "".join(str(sum(map(int, line[2:2 + k + 1])) % m) for k in range(toy.DIGITS))
            assert work[-1] == nxt
        else:
            assert work == ""
    # shares 0.5 of 300 (sd ~ 9) and ANSWER_SHARE of those (sd ~ 0.035 at 0.75)
    assert 110 < n_demo < 190 and abs(n_reducible / n_demo - toy.ANSWER_SHARE) < 0.12
    assert task.pretrain_samples(40, 5) == task.pretrain_samples(0, 45)[40:]


def test_think_share_sets_how_often_an_answer_is_worked_out(tok):
    """data.toy_think is the p_cot of the parity study: from step data.toy_think_from on, a share of the answers
    is worked out and the rest answered at once (an empty thought, still the true answer); before it, all are."""
    cfg = config.from_dict({"data": {"task": "toy", "template": "bare", "max_prompt_tokens": 136,
                                     "toy_demos": 1.0, "toy_think": 0.3, "toy_think_from": 10},
                            "rollout": {"max_tokens": 16}, "train": {"steps": 0, "ntp_steps": 100}})
    task = toy.ToyTask(tok, cfg.data, cfg.rollout, seed=5, sequences_per_step=20)
    build = PromptBuilder(tok, "bare", 136, token_bytes(tok))
    worked = []
    pairs = [(q.tokens[:q.start], q.tokens[q.start:]) for q in task.pretrain_samples(0, 800)]
    for i, (prompt, target) in enumerate(pairs):
        context = tok.decode(prompt[len(build.pre):-len(build.post)])
        completion = tok.decode(target, skip_special_tokens=False)
        if toy.kind(context) == "reducible":
            line = context[context.rfind("\n") + 1:]
            assert completion.split("</think>")[0] in ("", toy.thought(line))
            worked.append((i, not completion.startswith("</think>")))
        else:
            assert completion.startswith("</think>")
    before = [w for i, w in worked if i < 200]  # steps 0-9: 200 sequences
    after = [w for i, w in worked if i >= 200]
    assert all(before) and len(before) > 100
    # ~450 answers at a share of 0.3: sd ~ 0.022
    assert abs(np.mean(after) - 0.3) < 0.08
    # a share that would never apply is refused, naming the key
    with pytest.raises(config.ConfigError, match="data.toy_think_from = 100 is not before train.ntp_steps = 100"):
        config.from_dict({"data": {"task": "toy", "toy_think": 0.3, "toy_think_from": 100},
                          "train": {"steps": 0, "ntp_steps": 100}})


def test_corpus_file_is_jsonl_from_its_own_stream(tmp_path):
    path = toy.write_corpus(tmp_path / "c.jsonl", 5, seed=0)
    docs = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert docs == [toy.document(0, toy.CORPUS_OFFSET + i) for i in range(5)]
    assert not set(docs) & {toy.document(0, i) for i in range(1000)}
    assert [p.name for p in tmp_path.iterdir()] == ["c.jsonl"]  # no temporary left behind


def test_toy_tokenizer_is_byte_level_one_token_per_character(tok):
    text = toy.document(0, 1)
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text) and tok.decode(ids) == text
    table = token_bytes(tok)
    assert b"".join(table[i] for i in ids) == text.encode()
    box = tok.encode("</think>\\boxed{3}", add_special_tokens=False)
    assert len(box) == 4 and table[box[1]] == b"\\boxed{"
