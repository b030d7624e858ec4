"""Models made on the spot: a scratch model to train from (parity, toy) and the tests' tiny fixtures.

No download is needed and none is possible.

`make_tiny_model` writes a Hugging Face directory (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json with a chat template, generation_config.json)
that transformers and vLLM both load. Two tokenizers:

- "bpe": a byte-level BPE trained on the text shipped in `rptfast/assets/corpus.txt`,
  with Qwen-style chat tokens and `<think>`/`</think>`.
- "char": one token per character of a small alphabet (digits, separators) plus
  `<pad>`, `<bos>`, `<eos>`, for synthetic tasks such as parity.
- "toy": the char alphabet plus what next-token reasoning needs (rptfast.tasks.toy): chat tokens,
  `<think>`/`</think>`, `\\boxed{` as one token and `}`, with a chat template that has no words
  (a model trained from scratch on the toy corpus knows none).

head_dim is 64 because vLLM's CPU attention rejects smaller heads. Everything is
deterministic for a seed (weights from `torch.manual_seed`, BPE training is
deterministic for a fixed corpus).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

CHAT_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
CHAR_SPECIALS = ["<pad>", "<bos>", "<eos>"]
CHAR_ALPHABET = list("0123456789") + [" ", ",", ":", "=", "|", "+", "-", "?", "\n"]

TOY_SPECIALS = CHAR_SPECIALS + ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]
TOY_ALPHABET = CHAR_ALPHABET + ["}"]
TOY_BOX = "\\boxed{"  # one (added, non-special) token, so a boxed answer costs 3 tokens
# user turn between <|im_start|> and <|im_end|>, then the generation prompt opens the thought
TOY_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['content'] + '<|im_end|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<think>' }}{%- endif %}"
)

# Thinking is on unless the caller passes enable_thinking=False (Qwen3 convention).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else %}{{- '<think>\\n' }}{%- endif %}"
    "{%- endif %}"
)


def corpus_text() -> str:
    """The small English/maths/code text shipped with the package."""
    return resources.files("rptfast.assets").joinpath("corpus.txt").read_text(encoding="utf-8")


def _bpe_tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=CHAT_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text().splitlines(keepends=True), trainer=trainer)
    return tok


def _char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(CHAR_SPECIALS + CHAR_ALPHABET)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(CHAR_SPECIALS)
    return tok


def _toy_tokenizer():
    """Byte-level BPE without merges over the toy alphabet: one token per character, and token
    bytes exact as rptfast.data.tokens needs them (the byte-level table maps "\n" to "Ċ")."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from rptfast.data.tokens import byte_decoder

    byte_char = {b: c for c, b in byte_decoder().items()}
    vocab = {t: i for i, t in enumerate(TOY_SPECIALS + [byte_char[ord(c)] for c in TOY_ALPHABET])}
    tok = Tokenizer(models.BPE(vocab, [], unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(TOY_SPECIALS)
    tok.add_tokens([AddedToken(TOY_BOX, normalized=False)])
    return tok


def write_tokenizer(path: str | Path, kind: str = "bpe", vocab: int = 512) -> dict[str, int]:
    """Write tokenizer.json + tokenizer_config.json into `path`; return the special token ids."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if kind == "bpe":
        tok = _bpe_tokenizer(vocab)
        eos, pad, bos = "<|im_end|>", "<|endoftext|>", None
        extra = {"chat_template": CHAT_TEMPLATE}
    elif kind == "char":
        tok = _char_tokenizer()
        eos, pad, bos = "<eos>", "<pad>", "<bos>"
        extra = {}
    elif kind == "toy":
        tok = _toy_tokenizer()
        eos, pad, bos = "<eos>", "<pad>", "<bos>"
        extra = {"chat_template": TOY_CHAT_TEMPLATE}
    else:
        raise ValueError(f"tokenizer kind must be 'bpe', 'char' or 'toy', got {kind!r}")
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos,
        "pad_token": pad,
        "bos_token": bos,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        **extra,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    ids = {"eos": tok.token_to_id(eos), "pad": tok.token_to_id(pad), "size": tok.get_vocab_size()}
    if bos is not None:
        ids["bos"] = tok.token_to_id(bos)
    return ids


def tiny_config(arch: str, vocab: int, layers: int, hidden: int, heads: int, kv_heads: int,
                intermediate: int, max_len: int, special: dict[str, int], tied: bool = False):
    """A transformers config of a standard architecture with head_dim 64 (tied: lm_head shares the embedding)."""
    from transformers import LlamaConfig, Qwen3Config

    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=64,
        max_position_embeddings=max_len,
        tie_word_embeddings=tied,
        eos_token_id=special["eos"],
        pad_token_id=special["pad"],
        bos_token_id=special.get("bos", special["eos"]),
        dtype="float32",
    )
    if hidden != heads * 64:
        raise ValueError(f"hidden ({hidden}) must be heads ({heads}) x head_dim 64")
    if arch == "qwen3":
        return Qwen3Config(**common)
    if arch == "llama":
        return LlamaConfig(**common)
    raise ValueError(f"arch must be 'qwen3' or 'llama', got {arch!r}")


def make_tiny_model(
    path: str | Path,
    arch: str = "qwen3",
    vocab: int = 512,
    layers: int = 2,
    seed: int = 0,
    *,
    tokenizer: str = "bpe",
    hidden: int = 128,
    heads: int = 2,
    kv_heads: int = 1,
    intermediate: int = 256,
    max_len: int = 2048,
    init_std: float = 0.02,
    tie_word_embeddings: bool = False,
) -> Path:
    """Write a randomly initialised HF model directory at `path` and return it.

    `vocab` is the model's vocabulary size; the BPE tokenizer is trained up to that size
    (a small corpus may give fewer merges; the extra rows of the embedding are unused,
    as in real models whose vocab is padded). With tokenizer="char" the vocabulary is
    the character set and `vocab` must be at least its size.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    special = write_tokenizer(path, tokenizer, vocab)
    if special["size"] > vocab:
        raise ValueError(f"vocab={vocab} is smaller than the tokenizer's {special['size']} tokens")
    config = tiny_config(arch, vocab, layers, hidden, heads, kv_heads, intermediate, max_len, special,
                         tie_word_embeddings)
    config.initializer_range = init_std
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    GenerationConfig(
        eos_token_id=special["eos"], pad_token_id=special["pad"], bos_token_id=config.bos_token_id
    ).save_pretrained(path)
    return path
