"""Tiny fixtures: deterministic, loadable by transformers, with the tokens the tasks need."""

import hashlib

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rptfast.testing import CHAR_ALPHABET, make_tiny_model


def digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_deterministic_for_a_seed(tmp_path):
    a = make_tiny_model(tmp_path / "a", "llama", vocab=384, layers=1, seed=3)
    b = make_tiny_model(tmp_path / "b", "llama", vocab=384, layers=1, seed=3)
    c = make_tiny_model(tmp_path / "c", "llama", vocab=384, layers=1, seed=4)
    assert digest(a) == digest(b)
    assert digest(a)["model.safetensors"] != digest(c)["model.safetensors"]


def test_bpe_fixture_loads_with_chat_template(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert model.config.head_dim == 64 and model.config.model_type == "qwen3"
    text = tok.apply_chat_template([{"role": "user", "content": "Complete: The river"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n<think>\n")
    for special in ("<think>", "</think>", "<|im_end|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    s = "Euclid proved that there are infinitely many primes."
    assert tok.decode(tok(s)["input_ids"]) == s
    assert tok.eos_token == "<|im_end|>"
    with torch.no_grad():
        assert model(torch.tensor([tok(s)["input_ids"]])).logits.shape[-1] == 512


def test_char_tokenizer_one_token_per_character(tmp_path):
    path = make_tiny_model(tmp_path / "c", "llama", vocab=32, layers=1, tokenizer="char")
    tok = AutoTokenizer.from_pretrained(path)
    s = "0110 1,0:1\n"
    ids = tok(s)["input_ids"]
    assert len(ids) == len(s) and tok.decode(ids) == s
    assert tok.eos_token == "<eos>" and tok.eos_token_id not in ids
    assert len(tok) == 3 + len(CHAR_ALPHABET)
