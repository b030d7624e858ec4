"""A small corpus in every format prepare reads, with the bad inputs it must count, and the documents
it should yield by id (a module name of its own: pytest puts this folder on sys.path).
"""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rptfast import config
from rptfast.testing import corpus_text

UNICODE = " Café crème, naïve façade; 中文 text and 🙂 too."


def write_corpus(root: Path) -> tuple[list[str], dict[str, str], dict[str, int]]:
    """Write the corpus under root; return (paths for --corpus, {doc_id: text} of good documents,
    {skip reason: expected count})."""
    lines = corpus_text().splitlines()
    root.mkdir(parents=True, exist_ok=True)
    docs: dict[str, str] = {}

    a = root / "a.txt"  # one document per file
    a.write_text(lines[0] + UNICODE + "\n" + lines[1] + "\n", encoding="utf-8")
    docs[str(a)] = a.read_text(encoding="utf-8")
    long = root / "long.txt"  # longer than the proxy window: scored in windows
    long.write_text(" ".join(lines[12:20]), encoding="utf-8")
    docs[str(long)] = long.read_text(encoding="utf-8")

    b = root / "b.jsonl"
    records = [json.dumps({"text": lines[2] + UNICODE, "id": 0}), json.dumps({"text": lines[3]}),
               "{not json", json.dumps({"body": "no text field"}), json.dumps({"text": None}),
               "", json.dumps({"text": lines[4]})]
    b.write_text("\n".join(records) + "\n", encoding="utf-8")
    for number in (1, 2, 7):
        docs[f"{b}#{number}"] = json.loads(records[number - 1])["text"]

    c = root / "c.parquet"
    pq.write_table(pa.table({"text": [lines[5], None, lines[6]], "n": [1, 2, 3]}), c)
    docs[f"{c}#0"], docs[f"{c}#2"] = lines[5], lines[6]

    d = root / "saved"  # as datasets' save_to_disk writes it: Arrow IPC streams + state.json
    d.mkdir(exist_ok=True)
    names = ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    saved = [lines[7], lines[8], lines[9], lines[13]]  # the last, "    return a", is too_short
    for name, rows in zip(names, [saved[:2], saved[2:]]):
        t = pa.table({"text": rows, "label": list(range(len(rows)))})
        with pa.OSFile(str(d / name), "wb") as sink, pa.ipc.new_stream(sink, t.schema) as w:
            w.write_table(t)
    (d / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                              "_fingerprint": "f", "_format_type": None, "_split": "train"}))
    (d / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string"}}}))
    for i, text in enumerate(saved[:3]):
        docs[f"{d}#{i}"] = text

    (root / "empty.txt").write_bytes(b"")
    (root / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))  # not UTF-8
    (root / "short.txt").write_text("Too short.", encoding="utf-8")
    paths = [str(a), str(b), str(c), str(d), str(long), str(root / "empty.txt"), str(root / "latin1.txt"),
             str(root / "short.txt")]
    skipped = {"bad_json": 1, "missing_field": 1, "not_text": 2, "empty_file": 1, "invalid_utf8": 1, "too_short": 2}
    return paths, docs, skipped


def prepare_config(**prepare) -> config.Config:
    settings = dict(min_context_tokens=8, max_positions_per_doc=6, continuation_tokens=4, context_tokens=40,
                    proxy_batch_tokens=256, proxy_window=128, shard_samples=8, eval_fraction=0.3, min_entropy=0.0)
    settings.update(prepare)
    return config.from_dict({"prepare": settings, "log": {"progress": False}})
