"""The sample store: Parquet shards and a manifest, written resumably, read lazily.

Layout of a directory written by `rptfast prepare`:

    shard-00000.parquet ...   samples (SCHEMA), zstd, row groups of ROW_GROUP rows
    manifest.json             written last; its presence means the store is complete

A shard is written as `.shard-NNNNN.parquet.tmp` and renamed, so a shard file is always
whole. Each shard carries in its Parquet metadata (key b"rptfast") the prepare state at the
moment it closed: how many corpus documents were consumed, every counter, the shard list.
Shards close only at document boundaries, so an interrupted prepare resumes from the last
shard's state: it re-reads (without tokenizing) the documents already consumed, then goes
on exactly as an uninterrupted run would have.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rptfast.errors import ConfigError, FileFormatError, atomic_path

FORMAT = "rptfast-rpt-samples/1"
ROW_GROUP = 256  # rows per Parquet row group: the unit the task reads at random
CACHED_ROW_GROUPS = 64  # row groups the reader keeps decoded
META_KEY = b"rptfast"

SCHEMA = pa.schema([
    ("doc_id", pa.string()),
    ("doc_index", pa.int64()),
    ("split", pa.string()),
    ("position", pa.int32()),
    ("byte_offset", pa.int64()),
    ("context", pa.string()),
    ("context_ids", pa.list_(pa.int32())),
    ("continuation", pa.string()),
    ("continuation_bytes", pa.binary()),
    ("continuation_ids", pa.list_(pa.int32())),
    ("boundaries", pa.list_(pa.int32())),
    ("entropy", pa.float32()),
])

COLUMNS = {
    "doc_id": "source path # record number (the path alone for a whole-file text document)",
    "doc_index": "ordinal of the document in the corpus stream (skipped documents count)",
    "split": "train | eval (held-out documents, prepare.eval_fraction)",
    "position": "token index t in the document: the context is the tokens before t",
    "byte_offset": "byte offset of token t in the document's UTF-8 text",
    "context": "text of the context tokens (the last prepare.context_tokens before t, from a character start)",
    "context_ids": "the context's token ids, as tokenized within the document",
    "continuation": "text of the ground-truth tokens from t on, up to the last valid boundary",
    "continuation_bytes": "the same as UTF-8 bytes: the g of the paper's Eq. 3",
    "continuation_ids": "the ground-truth token ids (continuation_ids[0] is the next token)",
    "boundaries": "cumulative byte lengths of the ground-truth tokens that end between characters: the valid "
                  "prediction lengths",
    "entropy": "the proxy's top-k next-token entropy at t (nats)",
}

# the difficulty splits of evaluation (the paper's easy/medium/hard): a sample is in a split when the proxy's
# entropy at its position is above the split's threshold
SPLITS = {"all": None, "easy": 0.5, "medium": 1.0, "hard": 1.5}


def split_masks(entropy: np.ndarray) -> dict[str, np.ndarray]:
    return {name: np.ones(len(entropy), bool) if low is None else entropy > low for name, low in SPLITS.items()}


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.parquet"


class ShardWriter:
    """Atomic shards with the prepare state in their metadata."""

    def __init__(self, out: Path, key: str):
        self.out, self.key = out, key

    def resume(self, explain=lambda state: "other settings, corpus, proxy or tokenizer") -> dict | None:
        """The state saved with the last whole shard (None for a fresh directory); drops partial files.

        explain(saved state) says what differs when the saved state was made with another key.
        """
        self.out.mkdir(parents=True, exist_ok=True)
        for tmp in self.out.glob(".shard-*.tmp*"):  # a write that a kill interrupted
            tmp.unlink()
        names = sorted(p.name for p in self.out.glob("shard-*.parquet"))
        if not names:
            return None
        if names != [shard_name(i) for i in range(len(names))]:
            raise ConfigError(f"{self.out} holds shards with gaps ({', '.join(names)}); delete the directory "
                              f"and run prepare again")
        state = read_state(self.out / names[-1])
        if state.get("key") != self.key:
            raise ConfigError(f"{self.out} holds an unfinished prepare made with other settings: {explain(state)}; "
                              f"finish it with the same arguments, or choose another --out")
        return state

    def write(self, rows: dict[str, list], state: dict) -> str:
        """Write one shard (its index is len(state['shards']) - 1) and return its file name."""
        name = state["shards"][-1]["file"]
        table = pa.Table.from_pydict(rows, schema=SCHEMA.with_metadata({META_KEY: json.dumps(state)}))
        with atomic_path(self.out / name) as tmp:
            pq.write_table(table, tmp, row_group_size=ROW_GROUP, compression="zstd")
        return name


def read_state(path: Path) -> dict:
    meta = pq.read_schema(path).metadata or {}
    if META_KEY not in meta:
        raise ConfigError(f"{path} is not a shard written by rptfast prepare (no {META_KEY.decode()} metadata)")
    return json.loads(meta[META_KEY])


def write_json(path: Path, obj: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


class SampleStore:
    """Random access to the samples of a complete store, a cached row group at a time.

    Only the split, entropy and doc_index columns are read up front (a few bytes per sample);
    a sample's other columns come from its row group when it is asked for.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if not manifest.is_file():
            if any(self.path.glob("shard-*.parquet")):
                raise ConfigError(f"sample store {str(path)!r} is unfinished (no manifest.json); run the same "
                                  f"`rptfast prepare` again to finish it")
            raise ConfigError(f"{str(path)!r} is not a sample store: no manifest.json; write one with "
                              f"`rptfast prepare --corpus ... --proxy ... --out {path}`")
        try:
            self.manifest = json.loads(manifest.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise FileFormatError(f"{manifest} is not valid JSON ({e}); run the prepare again into a new --out") \
                from None
        if not isinstance(self.manifest, dict):
            raise FileFormatError(f"{manifest} is not a JSON object; run the prepare again into a new --out")
        if self.manifest.get("format") != FORMAT:
            raise ConfigError(f"{manifest}: format {self.manifest.get('format')!r}, expected {FORMAT!r}; "
                              f"prepare the corpus again with this rptfast")
        try:
            self.files = [pq.ParquetFile(self.path / s["file"]) for s in self.manifest["shards"]]
            index = [f.read(columns=["split", "entropy", "doc_index"]) for f in self.files]
        except (pa.ArrowException, OSError) as e:  # a truncated shard: no Parquet footer
            raise FileFormatError(f"sample store {str(path)!r} has a damaged or missing shard ({e}); prepare it "
                                  f"again into a new --out") from None
        self.split = np.concatenate([np.asarray(t.column("split").to_pylist(), dtype=object) for t in index]
                                    or [np.empty(0, dtype=object)])  # [S]
        self.entropy = np.concatenate([t.column("entropy").to_numpy() for t in index]
                                      or [np.empty(0, dtype=np.float32)])  # [S]
        self.doc_index = np.concatenate([t.column("doc_index").to_numpy() for t in index]
                                        or [np.empty(0, dtype=np.int64)])  # [S]
        # global row -> (shard, row group, offset): start rows of every row group in store order
        self._groups = [(s, g) for s, f in enumerate(self.files) for g in range(f.num_row_groups)]
        sizes = [self.files[s].metadata.row_group(g).num_rows for s, g in self._groups]
        self._group_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()

    def __len__(self) -> int:
        return len(self.split)

    def rows(self, split: str) -> np.ndarray:
        """Global row ids of a split (train | eval | all), in store order."""
        if split == "all":
            return np.arange(len(self))
        return np.flatnonzero(self.split == split)

    def spread(self, rows: np.ndarray, n: int, seed: int) -> np.ndarray:
        """n of `rows` (0 = all), drawn across documents, seeded: one sample of each document in a shuffled
        order, then a second of each, and so on; returned in store order. 16 samples of a store of many
        documents come from 16 documents, not from the first one."""
        if not n or n >= len(rows):
            return rows
        perm = np.random.default_rng([seed, n]).permutation(len(rows))
        docs = self.doc_index[rows[perm]]  # [R] in shuffled order
        order = np.argsort(docs, kind="stable")
        rank = np.empty(len(rows), dtype=np.int64)  # k-th sample of its document in the shuffled order
        sorted_docs = docs[order]
        first = np.concatenate([[0], np.flatnonzero(sorted_docs[1:] != sorted_docs[:-1]) + 1])
        rank[order] = np.arange(len(rows)) - np.repeat(first, np.diff(np.concatenate([first, [len(rows)]])))
        take = perm[np.argsort(rank, kind="stable")[:n]]
        return np.sort(rows[take])

    def get(self, row: int) -> dict:
        """One sample as a dict of its columns."""
        g = int(np.searchsorted(self._group_start, row, side="right")) - 1
        if g in self._cache:
            self._cache.move_to_end(g)
        else:
            s, rg = self._groups[g]
            self._cache[g] = self.files[s].read_row_group(rg)
            if len(self._cache) > CACHED_ROW_GROUPS:
                self._cache.popitem(last=False)
        return self._cache[g].slice(row - int(self._group_start[g]), 1).to_pylist()[0]


def check_tokenizer(store: SampleStore, tokenizer, who: str) -> None:
    """Refuse a policy whose tokenizer is not the one the store's token ids and boundaries come from."""
    from rptfast.data.tokens import fingerprint

    if fingerprint(tokenizer) != store.manifest["tokenizer_sha256"]:
        raise ConfigError(f"{who} tokenizes text differently from the tokenizer the samples in {store.path} were "
                          f"made with ({store.manifest['tokenizer']!r}); prepare the corpus again with "
                          f"--tokenizer set to this model")
