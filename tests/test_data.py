"""`rptfast prepare` on a mixed-format corpus with the tiny model as proxy and policy tokenizer."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from rpt_corpus import prepare_config, write_corpus
from rptfast.kernels import reference
from transformers import AutoModelForCausalLM, AutoTokenizer

from rptfast import cli
from rptfast.config import ConfigError
from rptfast.data import store as store_mod
from rptfast.data.corpus import CorpusError, count_documents, documents, open_sources
from rptfast.data.filter import windows
from rptfast.data.prepare import heldout_documents, prepare
from rptfast.data.tokens import raw_text_encoder, token_bytes
from rptfast.testing import write_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def direct(tiny_dir, corpus):
    """{doc_id: fp64 entropies [n]} from plain HF forwards, one per proxy window (entry t: before token t)."""
    _, docs, _ = corpus
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    enc = raw_text_encoder(tok)
    lm = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    window = prepare_config().prepare.proxy_window
    out = {}
    with torch.no_grad():
        for doc_id, text in docs.items():
            ids = enc.encode(text, add_special_tokens=False).ids
            ent = np.full(len(ids), np.nan)
            for s, e, first in windows(len(ids), window):
                logits = lm(input_ids=torch.tensor([ids[s:e]])).logits[0].double()  # [e - s, V]
                ent[s + first:e] = reference.topk_entropy(logits[first - 1:-1], 16).numpy()
            out[doc_id] = ent
    return out


@pytest.fixture(scope="module")
def cfg(direct):
    """A threshold at the median entropy, so that the filter drops about half of the positions."""
    return prepare_config(min_entropy=float(np.median(np.concatenate([e[9:] for e in direct.values()]))))


@pytest.fixture(scope="module")
def store(tiny_dir, corpus, cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "s"
    manifest = prepare(cfg, corpus[0], tiny_dir, str(out))
    return out, manifest


def read_all(out: Path) -> list[dict]:
    return [r for f in sorted(out.glob("shard-*.parquet")) for r in pq.read_table(f).to_pylist()]


def test_samples_reconstruct_the_text_and_entropies_match_the_proxy(store, corpus, direct, cfg, tiny_dir):
    out, manifest = store
    _, docs, _ = corpus
    tb = token_bytes(AutoTokenizer.from_pretrained(tiny_dir))
    rows = read_all(out)
    assert rows and {r["split"] for r in rows} == {"train", "eval"}
    for r in rows:
        data = docs[r["doc_id"]].encode()
        ctx, g = r["context"].encode(), r["continuation_bytes"]
        at = r["byte_offset"]
        # context + continuation is the original text at that position
        assert data[at - len(ctx):at] == ctx and data[at:at + len(g)] == g
        assert r["continuation"].encode() == g
        assert b"".join(tb[i] for i in r["context_ids"]) == ctx
        assert b"".join(tb[i] for i in r["continuation_ids"]) == g
        # valid boundaries: cumulative token lengths, the first token whole, the last one the end of g
        cum = np.cumsum([len(tb[i]) for i in r["continuation_ids"]]).tolist()
        assert set(r["boundaries"]) <= set(cum) and r["boundaries"][0] == cum[0] and r["boundaries"][-1] == len(g)
        assert 1 <= len(r["continuation_ids"]) <= cfg.prepare.continuation_tokens
        assert cfg.prepare.min_context_tokens <= r["position"]
        if r["position"] <= cfg.prepare.context_tokens:
            assert ctx == data[:at] and len(r["context_ids"]) == r["position"]
        else:
            assert len(r["context_ids"]) <= cfg.prepare.context_tokens
        assert r["entropy"] >= cfg.prepare.min_entropy
        assert r["entropy"] == pytest.approx(direct[r["doc_id"]][r["position"]], abs=2e-5)
    # the capped subset, per document
    per_doc = {}
    for r in rows:
        per_doc.setdefault(r["doc_id"], []).append(r["position"])
    assert max(len(v) for v in per_doc.values()) <= cfg.prepare.max_positions_per_doc
    assert all(v == sorted(set(v)) for v in per_doc.values())


def test_manifest_counts_add_up(store, corpus, cfg):
    out, m = store
    _, docs, skipped = corpus
    c = m["counts"]
    d, p, s = c["documents"], c["positions"], c["samples"]
    assert d["read"] == d["with_samples"] + d["without_samples"] + sum(d["skipped"].values())
    assert d["with_samples"] + d["without_samples"] == len(docs)
    assert {k: v for k, v in d["skipped"].items() if v} == skipped
    assert set(m["skipped"]) == set(skipped) and all(m["skipped"][k]["why"] for k in skipped)
    assert {e["reason"] for e in m["skipped_examples"]} == set(skipped)
    assert p["scored"] == sum(v for k, v in p.items() if k != "scored")
    assert p["mid_character"] > 0 and p["low_entropy"] > 0 and p["over_cap"] > 0 and p["short_context"] > 0
    assert p["kept"] == s["total"] == s["train"] + s["eval"] == len(read_all(out))
    assert sum(x["rows"] for x in m["shards"]) == s["total"] and len(m["shards"]) > 2
    assert s["eval"] == sum(x["eval"] for x in m["shards"]) > 0
    assert m["proxy"] and m["tokenizer_sha256"] and m["settings"]["min_entropy"] == cfg.prepare.min_entropy
    assert c["tokens"] > 0 and m["this_run"]["tokens_per_s"] > 0


def test_interrupted_prepare_resumes_to_the_same_output(store, corpus, cfg, tiny_dir, tmp_path, monkeypatch,
                                                         capsys):
    out, manifest = store
    real = store_mod.ShardWriter.write
    calls = []

    def killed_after_first_shard(self, rows, state):
        calls.append(1)
        if len(calls) == 2:  # die while writing the second shard, leaving a partial file behind
            (self.out / f".{state['shards'][-1]['file']}.tmp").write_bytes(b"PAR1 partial")
            raise KeyboardInterrupt
        return real(self, rows, state)

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(store_mod.ShardWriter, "write", killed_after_first_shard)
    with pytest.raises(SystemExit) as e:  # Ctrl-C: a one-line hint and exit code 130, no traceback
        prepare(cfg, corpus[0], tiny_dir, str(resumed))
    assert e.value.code == 130 and "interrupted; rerun the same command to resume" in capsys.readouterr().err
    assert sorted(p.name for p in resumed.iterdir()) == [".shard-00001.parquet.tmp", "shard-00000.parquet"]
    monkeypatch.setattr(store_mod.ShardWriter, "write", real)
    with pytest.raises(ConfigError, match=r"unfinished prepare made with other settings: prepare.max_positions_per_doc "
                                          r"6 -> 5"):
        prepare(prepare_config(min_entropy=cfg.prepare.min_entropy, max_positions_per_doc=5), corpus[0], tiny_dir,
                str(resumed))
    again = prepare(cfg, corpus[0], tiny_dir, str(resumed))
    assert again["this_run"]["resumed_after_documents"] > 0
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(p.name for p in resumed.iterdir())
    for name in files:
        if name != "manifest.json":
            assert (out / name).read_bytes() == (resumed / name).read_bytes(), name
    strip = lambda m: {k: v for k, v in m.items() if k != "this_run"}  # noqa: E731
    assert strip(again) == strip(manifest)
    # a finished store is left alone; a different prepare into it is refused
    assert strip(prepare(cfg, corpus[0], tiny_dir, str(resumed))) == strip(manifest)
    with pytest.raises(CorpusError, match=r"other settings: prepare.min_entropy .* -> 0.0; choose another --out"):
        prepare(prepare_config(min_entropy=0.0), corpus[0], tiny_dir, str(resumed))


def test_paragraphs_and_stream_start(tmp_path):
    p = tmp_path / "p.txt"
    p.write_bytes(b"first line\nstill first\n\n\n  \nsecond\n\xff bad\n\nthird\n")
    cfg = prepare_config(txt_unit="paragraph").prepare
    got = [(d.index, d.doc_id, d.text, d.skip) for d in documents(open_sources([str(p)], cfg), cfg)]
    assert got == [(0, f"{p}#0", "first line\nstill first", None), (1, f"{p}#1", None, "invalid_utf8"),
                   (2, f"{p}#2", "third", None)]
    assert [d.index for d in documents(open_sources([str(p)], cfg), cfg, start=2)] == [2]


def test_count_documents_and_txt_directories_and_lines(tmp_path, corpus):
    cfg = prepare_config().prepare
    sources = open_sources(corpus[0], cfg)
    assert count_documents(sources, cfg) == len(list(documents(sources, cfg)))
    d = tmp_path / "texts"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("two\n\nlines here\n")
    (d / "sub" / "a.txt").write_text("one\n")
    (d / "notes.md").write_text("not text corpus")
    (d / "empty.txt").write_text("")
    for unit, want in (("file", [(f"{d}/b.txt", "two\n\nlines here\n"), (f"{d}/empty.txt", None),
                                 (f"{d}/sub/a.txt", "one\n")]),
                       ("line", [(f"{d}/b.txt#0", "two"), (f"{d}/b.txt#1", "lines here"), (f"{d}/empty.txt", None),
                                 (f"{d}/sub/a.txt#0", "one")])):
        c = prepare_config(txt_unit=unit).prepare
        src = open_sources([str(d)], c)
        assert [(x.doc_id, x.text) for x in documents(src, c)] == want
        assert count_documents(src, c) == len(want)


def test_heldout_documents_are_chosen_across_the_corpus():
    assert len(heldout_documents(7, 0.05, 0)) == 1  # a small corpus still gets a held-out set
    assert len(heldout_documents(200, 0.05, 0)) == 10 and heldout_documents(200, 0.05, 0) <= set(range(200))
    assert heldout_documents(200, 0.05, 0) != heldout_documents(200, 0.05, 1)
    assert heldout_documents(1, 0.5, 0) == set() and heldout_documents(9, 0.0, 0) == set()
    assert len(heldout_documents(3, 0.99, 0)) == 2  # never all of them


def test_store_splits_follow_the_heldout_documents(store):
    out, m = store
    rows = read_all(out)
    held = set(m["heldout_documents"])
    assert held and all((r["split"] == "eval") == (r["doc_index"] in held) for r in rows)
    assert {r["split"] for r in rows} == {"train", "eval"}


def test_progress_bar_has_a_total(tmp_path, tiny_dir, corpus, capsys):
    prepare(prepare_config(), corpus[0][:2], tiny_dir, str(tmp_path / "o"), progress=True)
    err = capsys.readouterr().err
    n = count_documents(open_sources(corpus[0][:2], prepare_config().prepare), prepare_config().prepare)
    assert f"{n}/{n}" in err and "doc" in err


def test_bad_corpus_paths_are_clear_errors(tmp_path, tiny_dir, corpus):
    cfg = prepare_config()
    jl = tmp_path / "x.jsonl"
    jl.write_text('{"content": "hello"}\n')
    with pytest.raises(CorpusError, match="prepare.text_field"):
        prepare(cfg, [str(jl)], tiny_dir, str(tmp_path / "o"))
    pq.write_table(__import__("pyarrow").table({"body": ["x"]}), tmp_path / "x.parquet")
    with pytest.raises(CorpusError, match=r"no column 'text' \(columns: body\)"):
        prepare(cfg, [str(tmp_path / "x.parquet")], tiny_dir, str(tmp_path / "o"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(CorpusError, match="cannot tell the format"):
        prepare(cfg, [str(tmp_path / "x.csv")], tiny_dir, str(tmp_path / "o"))
    with pytest.raises(FileNotFoundError):
        prepare(cfg, [str(tmp_path / "missing.txt")], tiny_dir, str(tmp_path / "o"))
    dd = tmp_path / "dd"
    (dd / "train").mkdir(parents=True)
    (dd / "train" / "state.json").write_text("{}")
    (dd / "dataset_dict.json").write_text('{"splits": ["train"]}')
    with pytest.raises(CorpusError, match="pass one split"):
        prepare(cfg, [str(dd)], tiny_dir, str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_proxy_with_another_tokenizer_is_refused(tmp_path, tiny_dir, corpus):
    other = tmp_path / "other_tok"
    write_tokenizer(other, "bpe", vocab=300)  # another vocabulary and merges
    with pytest.raises(CorpusError, match="tokenizes text differently"):
        prepare(prepare_config(), corpus[0][:1], tiny_dir, str(tmp_path / "o"), tokenizer=str(other))


def test_cli_prepare_exit_codes(tmp_path, tiny_dir, corpus, capsys):
    out = tmp_path / "cli"
    common = ["--proxy", tiny_dir, "--out", str(out), "--set", "prepare.min_context_tokens=8",
              "--set", "log.progress=false"]
    assert cli.main(["prepare", "--corpus", *corpus[0][:2], *common]) == 0
    assert json.loads((out / "manifest.json").read_text())["counts"]["samples"]["total"] > 0
    assert cli.main(["prepare", "--corpus", str(tmp_path / "nope.jsonl"), *common]) == 2
    assert cli.main(["prepare", "--corpus", corpus[0][0], *common, "--set", "prepare.top_k=1"]) == 2
    assert "prepare.top_k" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["prepare", "--corpus", corpus[0][0], "--out", str(out)])  # no --proxy
    assert e.value.code == 2


def test_unfinished_store_is_not_read(tmp_path):
    (tmp_path / "shard-00000.parquet").write_bytes(b"")
    with pytest.raises(ConfigError, match="unfinished"):
        store_mod.SampleStore(tmp_path)
    with pytest.raises(ConfigError, match="not a sample store"):
        store_mod.SampleStore(tmp_path / "nothing")


def test_pydoc_corpus_is_one_document_per_topic(tmp_path, capsys):
    from pydoc_data.topics import topics

    path = tmp_path / "pydoc.jsonl"
    assert cli.main(["corpus", "pydoc", "--out", str(path)]) == 0
    assert f"wrote {len(topics)} documents" in capsys.readouterr().out
    cfg = prepare_config().prepare
    sources = open_sources([str(path)], cfg)
    docs = list(documents(sources, cfg))
    assert [d.text for d in docs] == [topics[k] for k in sorted(topics)] and count_documents(sources, cfg) == len(docs)
    assert [json.loads(line)["topic"] for line in path.open()] == sorted(topics)
    assert cli.main(["corpus", "pydoc", "--out", str(tmp_path / "pydoc.txt")]) == 2
    assert "*.jsonl" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pydoc.jsonl"]  # no temporary file left
    # --max-chars: every topic, each its first whole lines within the limit (a longer first line alone)
    cut = tmp_path / "cut.jsonl"
    assert cli.main(["corpus", "pydoc", "--out", str(cut), "--max-chars", "2000"]) == 0
    texts = [json.loads(line)["text"] for line in cut.open()]
    assert len(texts) == len(topics)
    for text, name in zip(texts, sorted(topics)):
        whole = topics[name]
        first_line = whole.split("\n", 1)[0]
        assert whole.startswith(text) and (text == whole or whole[len(text)] == "\n")
        assert len(text) <= 2000 or text == first_line
        assert text == whole or len(text) + len(whole[len(text):].split("\n", 2)[1]) + 1 > 2000 or text == first_line
    assert sum(map(len, texts)) < sum(map(len, topics.values())) / 3
    assert cli.main(["corpus", "pydoc", "--out", str(cut), "--max-chars", "-1"]) == 2


def test_prepare_reads_pydoc_with_the_real_smollm2(tmp_path, smollm2_dir):
    """The three shortest topics through prepare with SmolLM2 as proxy and tokenizer (about 10 s): samples spell the
    text back, and the entropies are those of a plain fp64 HF forward (tolerance as for the tiny proxy, whose fp32
    error the fp32 proxy shares)."""
    from pydoc_data.topics import topics

    full = tmp_path / "pydoc.jsonl"
    assert cli.main(["corpus", "pydoc", "--out", str(full)]) == 0
    lines = sorted(full.read_text().splitlines(), key=lambda line: len(json.loads(line)["text"]))[:3]
    corpus = tmp_path / "short.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    texts = {f"{corpus}#{n}": json.loads(line)["text"] for n, line in enumerate(lines, 1)}
    assert set(texts.values()) <= set(topics.values())
    cfg = prepare_config(min_context_tokens=16, max_positions_per_doc=0, continuation_tokens=4, context_tokens=512,
                         proxy_batch_tokens=4096, proxy_window=2048, min_entropy=0.5)
    m = prepare(cfg, [str(corpus)], smollm2_dir, str(tmp_path / "store"))
    rows = read_all(tmp_path / "store")
    c = m["counts"]
    assert c["documents"]["with_samples"] == 3 and c["positions"]["kept"] == len(rows) > 20
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tb = token_bytes(tok)
    lm = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float64)
    enc = raw_text_encoder(tok)
    for doc_id, text in texts.items():
        ids = enc.encode(text, add_special_tokens=False).ids
        with torch.no_grad():
            ent = reference.topk_entropy(lm(input_ids=torch.tensor([ids])).logits[0, :-1], 16).numpy()  # [n - 1]
        for r in (r for r in rows if r["doc_id"] == doc_id):
            data = text.encode()
            assert data[r["byte_offset"] - len(r["context"].encode()):r["byte_offset"]] == r["context"].encode()
            assert data[r["byte_offset"]:].startswith(r["continuation_bytes"])
            assert b"".join(tb[i] for i in r["continuation_ids"]) == r["continuation_bytes"]
            assert r["entropy"] == pytest.approx(ent[r["position"] - 1], abs=2e-5)
            assert r["entropy"] >= 0.5
