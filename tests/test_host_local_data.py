"""Host-local pretraining data: a process reads and tokenizes only the documents of its own rows.

* The rows are the ones the pipeline produced before host-local reading (nemojax main at
  d7a1f3e, which planned rows by tokenizing every document of the batch): frozen digests of a
  JSONL source (train and held-out validation) and of a Parquet + ArrayRecord + JSONL blend in
  pad mode.
* Each half of a data-parallel batch tokenizes about half of the documents, counted by wrapping
  the tokenizer and the ArrayRecord reader (not by the pipeline's own counters).
* Length indexes: written beside ArrayRecord files, by `nemojax tokenizer index` beside text
  files, else built once and cached by content; stale, corrupt or lying indexes are refused.
* Through the CLI: `nemojax train` in 2 processes x 4 CPU devices (data 2 x tensor 4) -- each
  process tokenizes about half of what one process does, and builds exactly its rows of the
  single-process batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from multiproc import launch_train
from nemojax.cli import main as cli_main
from nemojax.config import DataConfig, DataSourceConfig
from nemojax.data.length_index import read_index
from nemojax.data.pretrain import make_batch_iterator
from nemojax.data.sources import ArrayRecordFile, DataError, write_array_record
from nemojax.data.tokenizer import load_tokenizer

KEYS = ("input_ids", "targets", "positions", "segment_ids", "loss_mask")
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "naïve", "café", "δ-function",
         "def", "return", "    indent", "\n", "{", "}", "x = 1", "# comment", "data", "parallel", "42",
         "3.14159", "Nemotron", "grain", "packing", "résumé", "日本", "emoji🙂", "end.")
# sha256 of the rows (rows_digest) produced for the configs of
# test_rows_equal_the_frozen_rows_of_the_previous_pipeline: first frozen from nemojax main (d7a1f3e,
# before host-local reading), refrozen once when a source's order seed stopped depending on its
# directory (only the seed of each source's permutation changed; packing and reading did not).
FROZEN = {
    "jsonl_train": "58601376d610b12ed0d56c3618675ea3904bf0d9f671e406146b199f8cd2d94b",
    "jsonl_validation": "dc72d1a2596d8faf08d6155e533557554aa9d26e19b80c9eab0195a596e0a2c3",
    "blend_pad": "41693b1c29d380e004fec100f2ad2b2ed01e54a80c38d65e67237163bb4afa59",
}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("NEMOJAX_CACHE_DIR", str(d))
    return d


def corpus_texts(n: int, salt: str, *, max_words: int = 25, long_every: int = 7) -> list[str]:
    """n made-up documents: every 17th empty, about one in `long_every` of 40-99 words (longer
    than a row), the rest of 1..max_words words."""
    out = []
    for i in range(n):
        x = int.from_bytes(hashlib.sha256(f"{salt}:{i}".encode()).digest()[:8], "little")
        if i % 17 == 5:
            out.append("")
            continue
        count = 40 + x % 60 if long_every and x % long_every == 0 else 1 + x % max_words
        words = []
        for _ in range(count):
            x = (x * 6364136223846793005 + 1442695040888963407) % 2**64
            words.append(WORDS[(x >> 33) % len(WORDS)])
        out.append(" ".join(words))
    return out


def rows_digest(batches: list[dict[str, np.ndarray]]) -> str:
    h = hashlib.sha256()
    for b in batches:
        for k in KEYS:
            a = np.ascontiguousarray(b[k])
            h.update(f"{k}:{a.dtype.str}:{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def write_jsonl(path: Path, texts: list[str], blank_after: int | None = None) -> Path:
    with path.open("w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"text": t, "i": i}) + "\n")
            if i == blank_after:
                f.write("\n")
    return path


def write_corpus(d: Path) -> None:
    """The frozen configs' files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_jsonl(d / "docs.jsonl", corpus_texts(60, "j"), blank_after=9)
    pq.write_table(pa.table({"text": corpus_texts(50, "p")}), d / "docs.parquet", row_group_size=7)
    write_array_record(d / "tokens.arrayrecord", load_tokenizer("builtin").encode_batch(corpus_texts(40, "a")))


def frozen_digests() -> dict[str, str]:
    cfg = DataConfig(sources=[DataSourceConfig(path="docs.jsonl")], validation_fraction=0.1)
    train = make_batch_iterator(cfg, batch_size=8, seq_len=32, seed=0)
    val = make_batch_iterator(cfg, split="validation", batch_size=4, seq_len=32, seed=0)
    blend = DataConfig(sources=[DataSourceConfig(path="docs.parquet", weight=0.5),
                                DataSourceConfig(path="tokens.arrayrecord", weight=0.3),
                                DataSourceConfig(path="docs.jsonl", weight=0.2)],
                       validation_fraction=0.0, pack_mode="pad")
    mixed = make_batch_iterator(blend, batch_size=6, seq_len=24, seed=3)
    return {"jsonl_train": rows_digest([next(train) for _ in range(8)]),
            "jsonl_validation": rows_digest([next(val) for _ in range(3)]),
            "blend_pad": rows_digest([next(mixed) for _ in range(6)])}


def test_rows_equal_the_frozen_rows_of_the_previous_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path)
    assert frozen_digests() == FROZEN  # text indexes built on first use, cached
    assert "building the length index of docs.jsonl" in capfd.readouterr().err
    assert frozen_digests() == FROZEN  # from the cache: nothing rebuilt
    assert "building" not in capfd.readouterr().err
    # Indexes written beside the files by the CLI give the same rows.
    for f in ("docs.jsonl", "docs.parquet"):
        assert cli_main(["tokenizer", "index", "--input", f]) == 0
    assert frozen_digests() == FROZEN


def _counting(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count texts given to the tokenizer and records read from ArrayRecord files, outside the pipeline."""
    seen = {"tokenized": 0, "records": 0}
    tok = load_tokenizer("builtin")
    encode, read_many = tok.encode_batch, ArrayRecordFile.read_many

    def counted_encode(texts, *a, **k):
        seen["tokenized"] += len(texts)
        return encode(texts, *a, **k)

    def counted_read(self, idx):
        idx = list(idx)
        seen["records"] += len(idx)
        return read_many(self, idx)

    monkeypatch.setattr(tok, "encode_batch", counted_encode)
    monkeypatch.setattr(ArrayRecordFile, "read_many", counted_read)
    return seen


BATCHES = 5


def _reads(cfg: DataConfig, rows: list[int] | None, seen: dict[str, int]
           ) -> tuple[list[dict[str, np.ndarray]], dict[str, int]]:
    it = make_batch_iterator(cfg, batch_size=16, seq_len=128, seed=1, rows=rows)  # indexes built here
    before = dict(seen)
    out = [next(it) for _ in range(BATCHES)]
    got = {k: seen[k] - before[k] for k in seen}
    counts = it.reads()
    assert counts.tokenized == got["tokenized"] and counts.documents == got["tokenized"] + got["records"]
    if rows is None:  # the whole batch reads every non-empty document it reached exactly once
        s, c = it.streams[0], it.cursors[0]
        reached = [s.doc_len(k) for k in range(c.doc + (c.offset > 0))]
        assert counts.documents == sum(n > 0 for n in reached)
    return out, got


@pytest.mark.parametrize("fmt", ["jsonl", "arrayrecord"])
def test_each_half_of_a_batch_reads_about_half_the_documents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              fmt: str) -> None:
    texts = corpus_texts(400, "half", long_every=0)
    if fmt == "jsonl":
        path = write_jsonl(tmp_path / "c.jsonl", texts)
    else:
        path = tmp_path / "c.arrayrecord"
        write_array_record(path, load_tokenizer("builtin").encode_batch(texts))
    seen = _counting(monkeypatch)
    kind = "tokenized" if fmt == "jsonl" else "records"
    cfg = DataConfig(sources=[DataSourceConfig(path=str(path))], validation_fraction=0.0)
    full, n_full = _reads(cfg, None, seen)
    halves = [_reads(cfg, list(range(8)), seen), _reads(cfg, list(range(8, 16)), seen)]
    assert n_full[kind] > 100
    # The halves share only the document cut by the middle row of a batch and the one that a
    # batch continues from the previous (the whole batch reads that one once): at most 2 per batch.
    both = halves[0][1][kind] + halves[1][1][kind]
    assert n_full[kind] <= both <= n_full[kind] + 2 * BATCHES, (halves, n_full)
    for _, n in halves:
        assert n[kind] <= 0.6 * n_full[kind], (n, n_full)  # about half
        assert sum(n.values()) == n[kind]  # nothing else was read
    for b, lo, hi in zip(full, halves[0][0], halves[1][0]):
        for k in KEYS:
            np.testing.assert_array_equal(np.concatenate([lo[k], hi[k]]), b[k])


def test_array_record_index_is_written_beside_and_skipped_by_listings(tmp_path: Path) -> None:
    docs = [[5, 6, 7], [], list(range(100, 190)), [9]]
    write_array_record(tmp_path / "data" / "x.arrayrecord", docs)
    header, arrays = read_index(tmp_path / "data" / "x.arrayrecord.lenidx")
    assert arrays["lengths"].tolist() == [3, 0, 90, 1] and header["documents"] == 4
    assert header["source"]["sha256"] == hashlib.sha256((tmp_path / "data" / "x.arrayrecord").read_bytes()).hexdigest()
    # A directory (or glob) source holds the data files, not their indexes.
    (tmp_path / "text").mkdir()
    write_jsonl(tmp_path / "text" / "t.jsonl", ["one", "two"])
    assert cli_main(["tokenizer", "index", "--input", str(tmp_path / "text" / "t.jsonl")]) == 0
    for path, fmt, n in ((tmp_path / "data", "arrayrecord", 4), (tmp_path / "data" / "x.arrayrecord*", "arrayrecord", 4),
                         (tmp_path / "text", "jsonl", 2)):
        cfg = DataConfig(sources=[DataSourceConfig(path=str(path), format=fmt)], validation_fraction=0.0)
        it = make_batch_iterator(cfg, batch_size=1, seq_len=8, seed=0)
        assert len(it.streams[0].source) == n
        assert [Path(f).name.split(".")[0] for f in it.streams[0].source.index_files] == [{4: "x", 2: "t"}[n]]


def test_stale_corrupt_and_lying_indexes(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    src = write_jsonl(tmp_path / "s.jsonl", corpus_texts(30, "s"))
    cfg = DataConfig(sources=[DataSourceConfig(path=str(src))], validation_fraction=0.0)
    assert cli_main(["tokenizer", "index", "--input", str(src)]) == 0
    beside = next(tmp_path.glob("s.jsonl.*.lenidx"))
    info = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert info["index"] == str(beside) and info["documents"] == 30
    want = rows_digest([next(make_batch_iterator(cfg, batch_size=4, seq_len=16, seed=0)) for _ in range(1)])
    # Stale: the file changed after `tokenizer index` -> reported, ignored, rebuilt in the cache.
    write_jsonl(src, corpus_texts(31, "s"))
    it = make_batch_iterator(cfg, batch_size=4, seq_len=16, seed=0)
    err = capfd.readouterr().err
    assert "ignoring the stale length index" in err and "building the length index" in err
    assert len(it.streams[0].source) == 31
    # Corrupt: garbage where the index was -> ignored, the cached one is used.
    write_jsonl(src, corpus_texts(30, "s"))
    beside.write_bytes(b"not an index at all")
    it = make_batch_iterator(cfg, batch_size=4, seq_len=16, seed=0)
    assert "not a nemojax length index" in capfd.readouterr().err
    assert rows_digest([next(it)]) == want
    # Lying: an index that matches the file's identity but not its documents -> an error naming it.
    header, arrays = read_index(Path(it.streams[0].source.index_files[0]))
    from nemojax.data.length_index import write_index

    bad = {k: np.array(v) for k, v in arrays.items()}
    bad["lengths"] = bad["lengths"] + 1
    write_index(beside, {k: v for k, v in header.items() if k != "arrays"}, bad)
    with pytest.raises(DataError, match=r"length index says .*s\.jsonl\..*\.lenidx"):
        next(make_batch_iterator(cfg, batch_size=4, seq_len=16, seed=0))


def test_cached_index_is_found_by_content_from_another_path(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", corpus_texts(20, "copy"))
    make_batch_iterator(DataConfig(sources=[DataSourceConfig(path=str(a))]), batch_size=2, seq_len=16, seed=0)
    assert "building" in capfd.readouterr().err
    (tmp_path / "elsewhere").mkdir()
    b = Path(shutil.copy(a, tmp_path / "elsewhere" / "b.jsonl"))
    os.utime(b, ns=(1, 1))
    make_batch_iterator(DataConfig(sources=[DataSourceConfig(path=str(b))]), batch_size=2, seq_len=16, seed=0)
    assert "building" not in capfd.readouterr().err
    # Another tokenizer needs its own index.
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    model = load_tokenizer("builtin").path.read_bytes()
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(model)
    m.pieces[-1].score -= 1.0  # a different model file (fingerprint), same vocabulary
    (tok_dir / "tokenizer.model").write_bytes(m.SerializeToString())
    make_batch_iterator(DataConfig(tokenizer=str(tok_dir), sources=[DataSourceConfig(path=str(b))]),
                        batch_size=2, seq_len=16, seed=0)
    assert "building" in capfd.readouterr().err


# ---------------------------------------------------------------------------- through the CLI

STEPS, SEQ = 3, 64
TINY = [
    "configs/tiny.yaml", f"steps={STEPS}", "log_every=1", "eval_every=0", "checkpoint_every=0",
    "model.hidden_size=64", "model.num_layers=2", "model.num_heads=8", "model.num_kv_heads=4", "model.head_dim=8",
    "model.ffn_hidden_size=128", f"model.max_seq_len={SEQ}", f"data.seq_len={SEQ}", "data.global_batch_size=8",
    "mesh.data=2", "mesh.tensor=4",
]
READ_LINE = re.compile(r"nemojax data reads: split=train batch=(\d+) rows=(\d+)/8 documents=(\d+) tokenized=(\d+) "
                       r"tokens=\d+ total_documents=\d+ total_tokenized=\d+ rows_sha256=(\w+)")


def _rows_sha(batch: dict[str, np.ndarray]) -> str:
    return hashlib.sha256(b"".join(np.ascontiguousarray(batch[k]).tobytes() for k in sorted(batch))).hexdigest()[:16]


@pytest.mark.heavy
def test_train_in_two_processes_reads_half_per_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nemojax.config import load_config

    corpus = write_jsonl(tmp_path / "corpus.jsonl", corpus_texts(400, "cli", max_words=4, long_every=0))
    assert cli_main(["tokenizer", "index", "--input", str(corpus)]) == 0
    args = [*TINY, f"run_dir={tmp_path / 'run'}", f"data.sources=[{{path: '{corpus}', weight: 1.0}}]"]
    # What one process reads for the whole batch, and each half, computed here.
    cfg = load_config(str(Path(__file__).resolve().parent.parent / args[0]), args[1:])
    want = {}
    for name, rows in (("all", None), ("p0", [0, 1, 2, 3]), ("p1", [4, 5, 6, 7])):
        it = make_batch_iterator(cfg.data, batch_size=8, seq_len=SEQ, seed=cfg.data_seed, rows=rows)
        batches = [next(it) for _ in range(STEPS)]
        want[name] = (it.reads().tokenized, [_rows_sha(b) for b in batches])
    monkeypatch.setenv("NEMOJAX_LOG_DATA_READS", "1")
    done = launch_train(args, processes=2, devices_per_process=4, timeout=600)
    assert done.returncodes == [0, 0], done.explain()
    for p, name in enumerate(("p0", "p1")):
        lines = [READ_LINE.search(line) for line in done.stderr[p].splitlines() if "nemojax data reads" in line]
        assert [m and (m[1], m[2]) for m in lines] == [(str(b), "4") for b in range(1, STEPS + 1)], \
            done.stderr[p][-3000:]
        tokenized = sum(int(m[4]) for m in lines)
        assert [m[5] for m in lines] == want[name][1]  # exactly its rows of the one-process batch
        assert tokenized == want[name][0]
        assert tokenized <= 0.6 * want["all"][0], (tokenized, want["all"][0])  # about half
    # Shared between the processes: at most the documents cut at a process boundary (2 per batch).
    assert want["all"][0] <= want["p0"][0] + want["p1"][0] <= want["all"][0] + 2 * STEPS
    print(json.dumps({"documents_tokenized": {"one_process": want["all"][0], "process_0": want["p0"][0],
                                              "process_1": want["p1"][0]}}))


def test_file_hash_is_remembered_by_path_size_and_mtime(tmp_path: Path, _own_cache: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from nemojax.data import length_index

    monkeypatch.setattr(length_index, "MEMO_MIN_BYTES", 0)  # remember even this small file on disk
    monkeypatch.setattr(length_index, "_sha_memo", {})
    f = tmp_path / "f.jsonl"
    f.write_bytes(b"abc")
    assert length_index.file_sha256(f) == hashlib.sha256(b"abc").hexdigest()
    [memo] = (_own_cache / "lengths" / "sha256").iterdir()
    memo.write_text("0" * 64)
    length_index._sha_memo.clear()
    assert length_index.file_sha256(f) == "0" * 64  # a new process reads it back instead of hashing
    f.write_bytes(b"abcd")  # another size and mtime: hashed again
    assert length_index.file_sha256(f) == hashlib.sha256(b"abcd").hexdigest()
