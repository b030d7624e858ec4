"""The policy tokenizer seen as bytes: what each token id spells, and whether two tokenizers agree.

The reward works on bytes (the paper's Eq. 3), so prepare must know the exact bytes of every
token: the cumulative byte lengths of the ground-truth tokens are the valid prediction
boundaries. Byte-level BPE tokenizers (GPT-2, Qwen, Llama 3, DeepSeek) spell every token as
bytes through a fixed table, so the bytes are exact and a document's tokens join back into
its UTF-8 text. Other tokenizers (SentencePiece with its own space symbol and byte fallback)
are refused rather than approximated: their per-token bytes are not recoverable without
decoding whole prefixes.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache

import numpy as np

from rptfast.config import ConfigError


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable stand-in character -> the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _backend_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"tokenizer {type(tokenizer).__name__} has no fast (Rust) backend; rptfast needs a "
                          f"tokenizer.json-based fast tokenizer")
    return json.loads(backend.to_str())


def fingerprint(tokenizer) -> str:
    """sha256 of what decides how text becomes token ids: normalizer, pre-tokenizer, vocabulary, merges.

    Chat templates and added tokens are left out: two tokenizers of one family (a small proxy
    and its large sibling) may differ there and still cut raw text identically.
    """
    tree = _backend_json(tokenizer)
    core = {k: tree.get(k) for k in ("normalizer", "pre_tokenizer", "model")}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


def token_bytes(tokenizer) -> list[bytes]:
    """bytes spelled by every token id (added tokens: their content in UTF-8)."""
    tree = _backend_json(tokenizer)
    decoder = tree.get("decoder") or {}
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", [])]
    if "ByteLevel" not in kinds:
        raise ConfigError(f"the policy tokenizer is not byte-level BPE (decoder {decoder.get('type')!r}); "
                          f"rptfast's byte-exact reward needs one (Qwen, Llama 3, DeepSeek, GPT-2 families)")
    backend = tokenizer.backend_tokenizer
    added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
    table = byte_decoder()
    out = []
    for i in range(max(len(tokenizer), backend.get_vocab_size(with_added_tokens=True))):
        if i in added:
            out.append(added[i].encode("utf-8"))
            continue
        piece = backend.id_to_token(i)
        out.append(b"" if piece is None else bytes(table[c] for c in piece))
    return out


def raw_text_encoder(tokenizer):
    """A copy of the backend that encodes special-token strings in raw text as plain bytes.

    A document that contains "<|im_end|>" must not turn into the end-of-turn token.
    """
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.encode_special_tokens = True
    backend.no_truncation()
    backend.no_padding()
    return backend


def char_starts(data: bytes, offsets: np.ndarray) -> np.ndarray:
    """[len(offsets)] bool: whether each byte offset of UTF-8 data sits between two characters.

    The ends count as between; inside, a byte 0b10xxxxxx continues a multi-byte character.
    """
    inside = (offsets > 0) & (offsets < len(data))
    out = np.ones(len(offsets), dtype=bool)
    out[inside] = (np.frombuffer(data, dtype=np.uint8)[offsets[inside]] & 0xC0) != 0x80
    return out
