"""`rptfast convert gguf`: the shipped SmolLM2 GGUF as a HF directory, held to a forward pass written from the GGUF.

The converted directory is the session fixture `smollm2_dir` (tests/conftest.py), made once.
The reference below reads the GGUF with the `gguf` package alone and runs llama.cpp's
computation on its tensors as stored: Q and K rows in llama.cpp's permuted order with RoPE on
adjacent pairs, the way llama.cpp runs them. transformers instead un-permutes the rows at load
and rotates halves; the two agree only if that conversion (and the config: heads, KV heads,
eps, rope base, tied head) is right.
"""

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rptfast import cli
from rptfast.convert import RECORD, shipped_smollm2
from rptfast.data.tokens import token_bytes

PROBE = "def area(r):\n    return 3.14159 * r ** 2  # {π r²}\n\nThe capital of France is Paris, and of Italy,"


def gguf_reference_logits(path: Path, ids: list[int], dtype: torch.dtype) -> torch.Tensor:
    """[T, V] logits of a llama GGUF, computed from its dequantised tensors as llama.cpp lays them out."""
    r = gguf.GGUFReader(path)
    field = lambda k: r.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "llama"
    n_layers, H = field("llama.block_count"), field("llama.attention.head_count")
    KV = field("llama.attention.head_count_kv")
    eps, base = field("llama.attention.layer_norm_rms_epsilon"), field("llama.rope.freq_base")
    W = {t.name: torch.tensor(gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(n) for n in t.shape[::-1]]),
                              dtype=dtype) for t in r.tensors}
    x = W["token_embd.weight"][ids]  # [T, D]
    T, D = x.shape
    hd = D // H
    ang = torch.arange(T, dtype=dtype)[:, None] * base ** (-torch.arange(0, hd, 2, dtype=dtype) / hd)  # [T, hd/2]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]  # [T, 1, hd/2]

    def rope(q):  # [T, heads, hd]: llama.cpp's "normal" RoPE rotates adjacent pairs (2i, 2i + 1)
        a, b = q[..., 0::2], q[..., 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)

    def rms(v, w):
        return v / torch.sqrt((v * v).mean(-1, keepdim=True) + eps) * w

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(n_layers):
        b = {name.split(".")[2]: w for name, w in W.items() if name.startswith(f"blk.{i}.")}  # attn_q -> [out, in]
        h = rms(x, b["attn_norm"])
        q = rope((h @ b["attn_q"].T).view(T, H, hd))
        k = rope((h @ b["attn_k"].T).view(T, KV, hd)).repeat_interleave(H // KV, dim=1)  # [T, H, hd]
        v = (h @ b["attn_v"].T).view(T, KV, hd).repeat_interleave(H // KV, dim=1)
        s = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd)  # [H, T, T]
        p = s.masked_fill(~causal, -math.inf).softmax(-1)
        x = x + torch.einsum("hts,shd->thd", p, v).reshape(T, D) @ b["attn_output"].T
        h = rms(x, b["ffn_norm"])
        x = x + (torch.nn.functional.silu(h @ b["ffn_gate"].T) * (h @ b["ffn_up"].T)) @ b["ffn_down"].T
    return rms(x, W["output_norm.weight"]) @ W.get("output.weight", W["token_embd.weight"]).T


def test_the_directory_is_a_plain_hf_model(smollm2_dir):
    d = Path(smollm2_dir)
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", RECORD} <= {p.name for p in d.iterdir()}
    config = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    record = json.loads((d / RECORD).read_text())
    assert record["check"]["max_logit_diff"] <= record["check"]["tolerance"] and record["check"]["embedding_equal"]
    tok = AutoTokenizer.from_pretrained(d)
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template
    assert len(token_bytes(tok)) == 49152  # byte-level BPE: rptfast's byte-exact reward works on it
    lm = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = lm.generate(ids, max_new_tokens=2, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:]) == " Paris."


def test_logits_match_a_forward_written_from_the_gguf(smollm2_dir):
    """Against the reference in fp64: the converted model in fp32 within 2x the reference's own fp32 error (measured
    here; flash-attention's rule), and in fp64 within 1x of it: its one fp32 part is the RoPE table, which transformers
    computes in fp32 whatever the model's dtype. Measured: reference fp32 6.0e-5, converted fp32 6.7e-5, converted fp64
    1.7e-5 on logits up to 41. A wrong Q/K layout or config value moves logits by O(1)."""
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok(PROBE, add_special_tokens=False).input_ids
    src = shipped_smollm2()
    ref64 = gguf_reference_logits(src, ids, torch.float64)
    ref32_err = (gguf_reference_logits(src, ids, torch.float32).double() - ref64).abs().max().item()
    lm = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        got32 = lm(torch.tensor([ids])).logits[0].double()  # [T, V]
        got64 = lm.double()(torch.tensor([ids])).logits[0]
    scale = ref64.abs().max().item()
    assert len(ids) >= 30 and scale > 10 and 0 < ref32_err < 1e-3
    assert (got32 - ref64).abs().max().item() <= 2 * ref32_err
    assert (got64 - ref64).abs().max().item() <= ref32_err
    assert (got32.argmax(-1) == ref64.argmax(-1)).all()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_second_run_verifies_and_writes_nothing(smollm2_dir, capsys):
    d = Path(smollm2_dir)
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in d.iterdir()}
    config_sha = sha(d / "config.json")
    assert cli.main(["convert", "gguf", "smollm2", "--out", smollm2_dir]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in d.iterdir()} == before
    assert sha(d / "config.json") == config_sha


def expect_exit_2(capsys, argv, *names):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in out + err
    line = err.strip().splitlines()[-1]
    assert line.startswith("rptfast convert: error: "), line
    for name in names:
        assert name in line, (name, line)
    return line


def unsupported_gguf(path: Path) -> Path:
    """A valid GGUF of an architecture transformers does not read (rwkv7)."""
    w = gguf.GGUFWriter(path, "rwkv7")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_bad_inputs_exit_2_and_name_the_path(smollm2_dir, tmp_path, capsys):
    src = shipped_smollm2()
    text = tmp_path / "model.gguf"
    text.write_text("not a gguf file at all")
    truncated = tmp_path / "cut.gguf"
    with src.open("rb") as f:
        truncated.write_bytes(f.read(2_000_000))
    rwkv = unsupported_gguf(tmp_path / "rwkv.gguf")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    other = tmp_path / "other"  # a conversion record of another file
    other.mkdir()
    record = json.loads((Path(smollm2_dir) / RECORD).read_text())
    (other / RECORD).write_text(json.dumps({**record, "source": "/elsewhere/x.gguf", "source_sha256": "ab" * 32}))
    damaged = tmp_path / "damaged"  # this file's record, but its weights are gone
    damaged.mkdir()
    for name in (RECORD, "config.json"):
        shutil.copy(Path(smollm2_dir) / name, damaged / name)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    new = str(tmp_path / "new")
    cases = [
        (["convert", "gguf", str(tmp_path / "none.gguf"), "--out", new], ["none.gguf", "does not exist"]),
        (["convert", "gguf", str(tmp_path), "--out", new], [str(tmp_path), "directory"]),
        (["convert", "gguf", str(text), "--out", new], ["model.gguf", "not a GGUF file", "b'not '"]),
        (["convert", "gguf", str(truncated), "--out", new], ["cut.gguf", "truncated"]),
        (["convert", "gguf", str(rwkv), "--out", new], ["rwkv.gguf", "'rwkv7'", "transformers cannot convert"]),
        (["convert", "gguf", "smollm2", "--out", str(busy)], [str(busy), "not empty", "notes.txt"]),
        (["convert", "gguf", "smollm2", "--out", str(other)], [str(other), "another GGUF", "/elsewhere/x.gguf"]),
        (["convert", "gguf", "smollm2", "--out", str(damaged)], [str(damaged), "model.safetensors", "delete"]),
        (["convert", "gguf", "smollm2", "--out", str(a_file)], [str(a_file), "is a file"]),
    ]
    for argv, names in cases:
        expect_exit_2(capsys, argv, *names)
    assert not Path(new).exists() and not list(tmp_path.glob(".new.tmp-*"))  # nothing half-written
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]


def test_exit_code_2_from_the_process(tmp_path):
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"\x00" * 64)
    r = subprocess.run([sys.executable, "-m", "rptfast", "convert", "gguf", str(bad), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "weights.bin" in r.stderr.strip().splitlines()[-1]
