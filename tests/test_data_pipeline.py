"""The pretraining pipeline: packing, blending, shuffling, sharding, resume, sources, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nemojax.config import ConfigError, DataConfig, DataSourceConfig, config_from_dict
from nemojax.data.packing import Cursor, empty_rows, pack_row
from nemojax.data.pretrain import BatchIterator, make_batch_iterator, split_indices
from nemojax.data.sources import ArrayRecordFile, DataError, write_array_record
from nemojax.data.tokenizer import load_tokenizer

EOS = 3
BOS = 2
KEYS = ("input_ids", "targets", "positions", "segment_ids", "loss_mask")


def _pack(docs: list[list[int]], rows: int, seq_len: int, mode: str = "concat",
          start: Cursor | None = None) -> tuple[dict[str, np.ndarray], Cursor]:
    arrays = [np.array(d, np.int32) for d in docs]
    out = empty_rows(rows, seq_len)
    cur = start or Cursor()
    for r in range(rows):
        cur = pack_row(lambda k: arrays[k % len(arrays)], cur, out, r, eos_id=EOS, mode=mode)
    return out, cur


def test_packing_hand_example_concat() -> None:
    docs = [[10, 11, 12], [20, 21], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39]]
    out, cur = _pack(docs, rows=3, seq_len=8)
    np.testing.assert_array_equal(out["input_ids"][0], [10, 11, 12, EOS, 20, 21, EOS, 30])
    np.testing.assert_array_equal(out["segment_ids"][0], [1, 1, 1, 1, 2, 2, 2, 3])
    np.testing.assert_array_equal(out["positions"][0], [0, 1, 2, 3, 0, 1, 2, 0])
    # eos predicts nothing (its successor is another document); 30's target is read past the row.
    np.testing.assert_array_equal(out["targets"][0], [11, 12, EOS, 0, 21, EOS, 0, 31])
    np.testing.assert_array_equal(out["loss_mask"][0], [1, 1, 1, 0, 1, 1, 0, 1])
    # The long document continues on the next row as a new segment with positions from 0.
    np.testing.assert_array_equal(out["input_ids"][1], [31, 32, 33, 34, 35, 36, 37, 38])
    np.testing.assert_array_equal(out["segment_ids"][1], [1] * 8)
    np.testing.assert_array_equal(out["positions"][1], range(8))
    np.testing.assert_array_equal(out["targets"][1], [32, 33, 34, 35, 36, 37, 38, 39])
    np.testing.assert_array_equal(out["loss_mask"][1], [1] * 8)
    np.testing.assert_array_equal(out["input_ids"][2], [39, EOS, 10, 11, 12, EOS, 20, 21])
    np.testing.assert_array_equal(out["targets"][2], [EOS, 0, 11, 12, EOS, 0, 21, EOS])
    np.testing.assert_array_equal(out["loss_mask"][2], [1, 0, 1, 1, 1, 0, 1, 1])
    np.testing.assert_array_equal(out["segment_ids"][2], [1, 1, 2, 2, 2, 2, 3, 3])
    assert cur == Cursor(doc=4, offset=2)  # next: the eos of document 4 (= docs[1])


def test_packing_row_ending_just_before_eos_and_empty_docs() -> None:
    # Row of 3 ends right after the last real token: the target of that token is eos.
    out, cur = _pack([[5, 6, 7], []], rows=2, seq_len=3)
    np.testing.assert_array_equal(out["targets"][0], [6, 7, EOS])
    np.testing.assert_array_equal(out["loss_mask"][0], [1, 1, 1])
    # The next row opens with that eos alone (no target), then the empty document is skipped.
    np.testing.assert_array_equal(out["input_ids"][1], [EOS, 5, 6])
    np.testing.assert_array_equal(out["segment_ids"][1], [1, 2, 2])
    np.testing.assert_array_equal(out["loss_mask"][1], [0, 1, 1])
    with pytest.raises(Exception, match="empty documents"):
        pack_row(lambda k: np.zeros(0, np.int32), Cursor(), empty_rows(1, 4), 0, eos_id=EOS, max_empty=5)


def test_packing_pad_mode_keeps_short_documents_whole() -> None:
    docs = [[10, 11, 12], [20, 21], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39]]
    out, _ = _pack(docs, rows=3, seq_len=8, mode="pad")
    np.testing.assert_array_equal(out["input_ids"][0], [10, 11, 12, EOS, 20, 21, EOS, 0])
    np.testing.assert_array_equal(out["segment_ids"][0], [1, 1, 1, 1, 2, 2, 2, 0])  # 0 = padding
    np.testing.assert_array_equal(out["loss_mask"][0], [1, 1, 1, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(out["input_ids"][1], [30, 31, 32, 33, 34, 35, 36, 37])  # longer than a row
    np.testing.assert_array_equal(out["input_ids"][2], [38, 39, EOS, 10, 11, 12, EOS, 0])


def _check_rows(batch: dict[str, np.ndarray]) -> None:
    """Invariants every packed batch must satisfy."""
    ids, tgt, pos, seg, mask = (batch[k] for k in KEYS)
    for k, dt in zip(KEYS, (np.int32,) * 4 + (np.float32,)):
        assert batch[k].dtype == dt
    same_next = seg[:, 1:] == seg[:, :-1]
    # Inside a row, a supervised slot's target is the next input of the same document.
    inner = mask[:, :-1] == 1
    assert np.all(same_next[inner])
    np.testing.assert_array_equal(tgt[:, :-1][inner], ids[:, 1:][inner])
    # Never supervise eos -> next document, and never padding.
    assert np.all(mask[ids == EOS] == 0)
    assert np.all(mask[seg == 0] == 0)
    # Documents open with bos (as generate/serve prompts do); bos predicts the first token.
    assert np.all(mask[ids == BOS] == 1) and np.all(pos[ids == BOS] == 0)
    # Positions restart at 0 at every new segment and count up inside it.
    starts = np.concatenate([np.ones((seg.shape[0], 1), bool), ~same_next], axis=1)
    assert np.all(pos[starts] == 0)
    inside = same_next & (seg[:, 1:] > 0)  # padding (segment 0) has position 0 throughout
    assert np.all(pos[:, 1:][inside] == pos[:, :-1][inside] + 1)


@pytest.fixture(scope="module")
def builtin_cfg() -> DataConfig:
    return DataConfig()  # the default blend: builtin:prose 0.7 + builtin:code 0.3


def test_builtin_batches_shapes_and_invariants(builtin_cfg: DataConfig) -> None:
    it = make_batch_iterator(builtin_cfg, batch_size=16, seq_len=128, seed=0)
    for _ in range(5):
        b = next(it)
        assert set(b) == set(KEYS)
        assert all(v.shape == (16, 128) for v in b.values())
        _check_rows(b)
    tok = load_tokenizer("builtin")
    assert b["input_ids"].max() < tok.vocab_size
    assert b["loss_mask"].mean() > 0.95  # concat packing wastes almost nothing


def test_exact_resume_including_batch_size_change(builtin_cfg: DataConfig) -> None:
    it = make_batch_iterator(builtin_cfg, batch_size=8, seq_len=64, seed=3)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # must survive JSON
    expected = [next(it) for _ in range(4)]
    fresh = make_batch_iterator(builtin_cfg, batch_size=8, seq_len=64, seed=3)
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        for k in KEYS:
            np.testing.assert_array_equal(got[k], want[k])
    # Ramp-up: a batch of 4 continues from the same row; two of them equal one batch of 8.
    small = make_batch_iterator(builtin_cfg, batch_size=4, seq_len=64, seed=3)
    small.set_state(state)
    for want in expected[:2]:
        a, b = next(small), next(small)
        for k in KEYS:
            np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), want[k])
    # A state from another configuration is refused with the reason.
    other = make_batch_iterator(builtin_cfg, batch_size=8, seq_len=32, seed=3)
    with pytest.raises(DataError, match="seq_len"):
        other.set_state(state)


def test_determinism_from_seed(builtin_cfg: DataConfig) -> None:
    a = make_batch_iterator(builtin_cfg, batch_size=4, seq_len=64, seed=11)
    b = make_batch_iterator(builtin_cfg, batch_size=4, seq_len=64, seed=11)
    c = make_batch_iterator(builtin_cfg, batch_size=4, seq_len=64, seed=12)
    xa, xb, xc = ([next(i)["input_ids"] for _ in range(3)] for i in (a, b, c))
    np.testing.assert_array_equal(np.stack(xa), np.stack(xb))
    assert not np.array_equal(np.stack(xa), np.stack(xc))


def test_order_does_not_depend_on_where_the_data_lives(tmp_path: Path) -> None:
    """The same file in another directory (another run directory, another host's mount) gives the
    same batches: nemojax align writes its world inside the run directory, and seed 0 of a run in
    one place must be seed 0 anywhere. Two different files of one blend are still told apart."""
    rng = np.random.default_rng(4)
    docs = _marked_docs(60, 10, rng)
    for d in ("run_a/world", "elsewhere/run_b/world"):
        (tmp_path / d).mkdir(parents=True)
        write_array_record(tmp_path / d / "corpus.arrayrecord", docs)

    def first_batches(d: str, seed: int = 0) -> np.ndarray:
        cfg = DataConfig(sources=[DataSourceConfig(path=str(tmp_path / d / "corpus.arrayrecord"))],
                         validation_fraction=0.0)
        it = make_batch_iterator(cfg, batch_size=4, seq_len=16, seed=seed)
        return np.stack([next(it)["input_ids"] for _ in range(4)])

    np.testing.assert_array_equal(first_batches("run_a/world"), first_batches("elsewhere/run_b/world"))
    assert not np.array_equal(first_batches("run_a/world"), first_batches("run_a/world", seed=1))
    (tmp_path / "other").mkdir()  # same file name, other documents
    write_array_record(tmp_path / "other/corpus.arrayrecord", _marked_docs(61, 10, rng))
    blend = DataConfig(sources=[DataSourceConfig(path=str(tmp_path / "run_a/world/corpus.arrayrecord"), weight=0.5),
                                DataSourceConfig(path=str(tmp_path / "other/corpus.arrayrecord"), weight=0.5)],
                       validation_fraction=0.0)
    seeds = [s["seed"] for s in make_batch_iterator(blend, batch_size=4, seq_len=16, seed=0).get_state()["sources"]]
    assert seeds[0] != seeds[1]


def test_a_moved_run_resumes_and_continues_its_stream(tmp_path: Path) -> None:
    """A data position saved with the file at one path is found again with the file moved: exact
    resume (set_state), a next stage that continues it, and reshuffle's refusal to replay it."""
    docs = _marked_docs(50, 10, np.random.default_rng(5))

    def cfg_at(d: str) -> DataConfig:
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
        write_array_record(tmp_path / d / "corpus.arrayrecord", docs)
        return DataConfig(sources=[DataSourceConfig(path=str(tmp_path / d / "corpus.arrayrecord"))],
                          validation_fraction=0.0)

    here, there = cfg_at("a"), cfg_at("b/c")
    run = make_batch_iterator(here, batch_size=4, seq_len=16, seed=0)
    for _ in range(3):
        next(run)
    state = run.get_state()
    expected = [next(run)["input_ids"] for _ in range(3)]
    moved = make_batch_iterator(there, batch_size=4, seq_len=16, seed=0)
    moved.set_state(state)
    np.testing.assert_array_equal(np.stack([next(moved)["input_ids"] for _ in range(3)]), np.stack(expected))
    nxt = make_batch_iterator(there, batch_size=4, seq_len=16, seed=7)  # a next stage, its own seed
    assert "continues where the previous run stopped" in nxt.continue_from(state)[0]
    np.testing.assert_array_equal(next(nxt)["input_ids"], expected[0])
    with pytest.raises(ConfigError, match="same order"):
        make_batch_iterator(there, batch_size=4, seq_len=16, seed=0).continue_from(state, mode="reshuffle")
    other = DataConfig(sources=[DataSourceConfig(path=str(tmp_path / "a" / "corpus.arrayrecord"), weight=0.5),
                                DataSourceConfig(path=str(tmp_path / "b/c" / "corpus.arrayrecord"), weight=0.5)],
                       validation_fraction=0.0)
    with pytest.raises(DataError, match="configuration changed"):  # a different blend is still refused
        make_batch_iterator(other, batch_size=4, seq_len=16, seed=0).set_state(state)


def test_validation_split_is_held_out_and_repeatable(builtin_cfg: DataConfig) -> None:
    for n in (1, 2, 50, 1000):
        tr, va = split_indices(n, "train", 0.05), split_indices(n, "validation", 0.05)
        assert not set(tr) & set(va) and len(tr) + len(va) == n and len(tr) >= 1
        assert (len(va) >= 1) == (n >= 2)
    va = split_indices(1000, "validation", 0.05)
    assert 25 <= len(va) <= 75
    v1 = make_batch_iterator(builtin_cfg, split="validation", batch_size=4, seq_len=64, seed=1)
    v2 = make_batch_iterator(builtin_cfg, split="validation", batch_size=4, seq_len=64, seed=99)
    for _ in range(3):  # the training seed does not change the evaluation set
        np.testing.assert_array_equal(next(v1)["input_ids"], next(v2)["input_ids"])
    tr = make_batch_iterator(builtin_cfg, batch_size=4, seq_len=64, seed=1)
    assert not np.array_equal(next(tr)["input_ids"], next(make_batch_iterator(
        builtin_cfg, split="validation", batch_size=4, seq_len=64, seed=1))["input_ids"])


# ---------------------------------------------------------------------------- synthetic sources


def _marked_docs(n: int, base: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Document i is `base + i` repeated (length 1..40): every token names its document."""
    return [np.full(int(rng.integers(1, 41)), base + i, np.int32) for i in range(n)]


def _collect_rows(it: BatchIterator, batches: int) -> dict[str, np.ndarray]:
    got = [next(it) for _ in range(batches)]
    return {k: np.concatenate([g[k] for g in got]) for k in KEYS}


def test_blend_holds_its_proportions(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ranges = {"a": 100, "b": 1000, "c": 2000}
    for name, base in ranges.items():  # token values tell the sources apart
        write_array_record(tmp_path / f"{name}.arrayrecord", _marked_docs(300, base, rng))
    cfg = DataConfig(sources=[DataSourceConfig(path=str(tmp_path / "a.arrayrecord"), weight=0.70),
                              DataSourceConfig(path=str(tmp_path / "b.arrayrecord"), weight=0.15),
                              DataSourceConfig(path=str(tmp_path / "c.arrayrecord"), weight=0.15)])
    it = make_batch_iterator(cfg, batch_size=20, seq_len=32, seed=0)
    rows = _collect_rows(it, 100)
    ids, seg = rows["input_ids"], rows["segment_ids"]
    real = (seg > 0) & (ids != EOS) & (ids != BOS)
    counts = np.array([np.sum(real & (ids >= 100) & (ids < 1000)),
                       np.sum(real & (ids >= 1000) & (ids < 2000)),
                       np.sum(real & (ids >= 2000))])
    share = counts / counts.sum()
    np.testing.assert_allclose(share, [0.70, 0.15, 0.15], atol=0.01)
    # Every row comes from exactly one source...
    assert all(len({int(v) // 1000 for v in r[(r != EOS) & (r != BOS)]}) == 1 for r in ids)
    # ...and any prefix of the stream holds the weights to within one row.
    picks = _row_sources(ids)
    for n in (10, 37, 200):
        frac = np.bincount(picks[:n], minlength=3)
        assert np.all(np.abs(frac - n * np.array([0.7, 0.15, 0.15])) <= 1.0 + 1e-9)


def test_any_row_subset_is_exactly_those_rows_of_the_global_batch(tmp_path: Path) -> None:
    """A process asks for the rows its devices hold: halves (data parallel across hosts), all rows
    (tensor/pipeline parallel across hosts: replicas load the same rows), or a strided set. Each
    gets exactly those rows of the single-process global batch, and the stream state (which any
    process may save) is the same whatever rows were asked for."""
    rng = np.random.default_rng(1)
    write_array_record(tmp_path / "d.arrayrecord", _marked_docs(101, 10, rng))
    write_array_record(tmp_path / "e.arrayrecord", _marked_docs(57, 500, rng))
    cfg = DataConfig(sources=[DataSourceConfig(path=str(tmp_path / "d.arrayrecord"), weight=0.6),
                              DataSourceConfig(path=str(tmp_path / "e.arrayrecord"), weight=0.4)],
                     validation_fraction=0.0)
    full = make_batch_iterator(cfg, batch_size=8, seq_len=16, seed=5)
    want = [next(full) for _ in range(12)]  # more than an epoch of the smaller source
    for rows in ([0, 1, 2, 3], [4, 5, 6, 7], list(range(8)), [1, 3, 5, 7], [6, 2]):
        it = make_batch_iterator(cfg, batch_size=8, seq_len=16, seed=5, rows=rows)
        for w in want:
            got = next(it)
            for k in KEYS:
                np.testing.assert_array_equal(got[k], w[k][rows], err_msg=f"rows {rows}: {k}")
        assert it.get_state() == full.get_state()
    with pytest.raises(ConfigError, match="not all in the global batch"):
        make_batch_iterator(cfg, batch_size=8, seq_len=16, seed=5, rows=[7, 8])


def test_documents_are_framed_with_bos_like_generate_prompts(tmp_path: Path) -> None:
    """One tokenization convention: a pretraining document is exactly what `generate` / `serve`
    feed the model for that text (tok.encode(text, bos=True)), followed by eos."""
    tok = load_tokenizer("builtin")
    text = "The quick brown fox jumps over the lazy dog."
    p = tmp_path / "one.jsonl"
    p.write_text(json.dumps({"text": text}) + "\n")
    cfg = DataConfig(sources=[DataSourceConfig(path=str(p))], validation_fraction=0.0)
    b = next(make_batch_iterator(cfg, batch_size=1, seq_len=64, seed=0))
    prompt = tok.encode(text, bos=True)
    n = len(prompt)
    assert prompt[0] == tok.bos_id == BOS
    np.testing.assert_array_equal(b["input_ids"][0, :n + 1], prompt + [EOS])
    np.testing.assert_array_equal(b["targets"][0, :n], prompt[1:] + [EOS])  # bos predicts the first token
    np.testing.assert_array_equal(b["loss_mask"][0, :n + 1], [1.0] * n + [0.0])
    np.testing.assert_array_equal(b["input_ids"][0, n + 1], BOS)  # the next document (the same, next epoch)
    np.testing.assert_array_equal(b["segment_ids"][0, :n + 2], [1] * (n + 1) + [2])


def test_packing_with_bos_hand_example() -> None:
    docs = [np.array([10, 11, 12], np.int32), np.array([20], np.int32)]
    out = empty_rows(2, 6)
    cur = pack_row(lambda k: docs[k % 2], Cursor(), out, 0, eos_id=EOS, bos_id=BOS)
    cur = pack_row(lambda k: docs[k % 2], cur, out, 1, eos_id=EOS, bos_id=BOS)
    np.testing.assert_array_equal(out["input_ids"], [[BOS, 10, 11, 12, EOS, BOS], [20, EOS, BOS, 10, 11, 12]])
    np.testing.assert_array_equal(out["targets"], [[10, 11, 12, EOS, 0, 20], [EOS, 0, 10, 11, 12, EOS]])
    np.testing.assert_array_equal(out["loss_mask"], [[1, 1, 1, 1, 0, 1], [1, 0, 1, 1, 1, 1]])
    np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 1, 1, 2], [1, 1, 2, 2, 2, 2]])
    np.testing.assert_array_equal(out["positions"], [[0, 1, 2, 3, 4, 0], [0, 1, 0, 1, 2, 3]])
    assert cur == Cursor(doc=2, offset=4)  # document 2 (= docs[0]) continues with its eos


def test_array_record_helper_round_trip(tmp_path: Path) -> None:
    docs = [[1, 2, 3], [], list(range(4000, 4090)), [7]]
    assert write_array_record(tmp_path / "x.arrayrecord", docs) == 4
    f = ArrayRecordFile(tmp_path / "x.arrayrecord")
    assert len(f) == 4
    assert [f[i].tolist() for i in range(4)] == docs
    with pytest.raises(DataError, match="1-D"):
        write_array_record(tmp_path / "y.arrayrecord", [[[1, 2]]])


def _decoded_documents(cfg: DataConfig, n_rows: int) -> list[str]:
    """Run a single-source iterator and cut its row stream back into documents."""
    tok = load_tokenizer(cfg.tokenizer)
    rows = _collect_rows(make_batch_iterator(cfg, batch_size=4, seq_len=32, seed=0), n_rows // 4)
    stream = rows["input_ids"].reshape(-1).tolist()
    docs, cur = [], []
    for t in stream:
        if t == EOS:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(t)
    return docs


TEXTS = [f"Document number {i}: the {'quick ' * (i % 5)}brown fox, line two\n    indented {i}." for i in range(30)]


def test_jsonl_source(tmp_path: Path) -> None:
    p = tmp_path / "docs.jsonl"
    with p.open("w") as f:
        for i, t in enumerate(TEXTS):
            f.write(json.dumps({"id": i, "content": t}) + "\n")
            if i == 3:
                f.write("\n")  # blank lines are skipped
    cfg = DataConfig(sources=[DataSourceConfig(path=str(p), text_field="content")], validation_fraction=0.0)
    docs = _decoded_documents(cfg, 200)
    assert set(docs[:30]) == set(TEXTS)  # exactly one epoch, shuffled, every document intact
    assert docs[:30] != TEXTS


def test_parquet_source(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": TEXTS, "n": list(range(30))}), p, row_group_size=7)
    cfg = DataConfig(sources=[DataSourceConfig(path=str(p))], validation_fraction=0.0)
    assert set(_decoded_documents(cfg, 200)[:30]) == set(TEXTS)
    bad = DataConfig(sources=[DataSourceConfig(path=str(p), text_field="body")])
    with pytest.raises(DataError, match=r"docs\.parquet.*no column 'body'"):
        make_batch_iterator(bad, batch_size=2, seq_len=16, seed=0)


def test_glob_of_files_and_separate_validation_list(tmp_path: Path) -> None:
    for k in range(3):
        with (tmp_path / f"part-{k}.jsonl").open("w") as f:
            for t in TEXTS[k * 10:(k + 1) * 10]:
                f.write(json.dumps({"text": t}) + "\n")
    (tmp_path / "val.jsonl").write_text(json.dumps({"text": "held out text"}) + "\n")
    cfg = DataConfig(sources=[DataSourceConfig(path=str(tmp_path / "part-*.jsonl"))],
                     validation=[DataSourceConfig(path=str(tmp_path / "val.jsonl"))])
    assert set(_decoded_documents(cfg, 200)[:30]) == set(TEXTS)  # no hold-out from the sources
    v = next(make_batch_iterator(cfg, split="validation", batch_size=2, seq_len=16, seed=0))
    assert "held out text" in load_tokenizer("builtin").decode(v["input_ids"][0].tolist())


def test_clear_errors_for_missing_files_and_bad_lines(tmp_path: Path) -> None:
    missing = DataConfig(sources=[DataSourceConfig(path=str(tmp_path / "nowhere.jsonl"))])
    with pytest.raises(DataError, match=r"data\.sources\[0\].*nowhere\.jsonl"):
        make_batch_iterator(missing, batch_size=2, seq_len=16, seed=0)
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": "fine"}) + "\n"
                 + json.dumps({"body": "no text key"}) + "\n")
    cfg = DataConfig(sources=[DataSourceConfig(path=str(p))], validation_fraction=0.0)
    with pytest.raises(DataError, match=r"bad\.jsonl:3: no 'text' field \(found: body\)"):
        next(make_batch_iterator(cfg, batch_size=2, seq_len=16, seed=0))
    p.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        next(make_batch_iterator(cfg, batch_size=2, seq_len=16, seed=0))
    with pytest.raises(DataError, match="format"):
        make_batch_iterator(DataConfig(sources=[DataSourceConfig(path=str(tmp_path / "x.csv"))]),
                            batch_size=2, seq_len=16, seed=0)
    with pytest.raises(DataError, match="poetry"):
        make_batch_iterator(DataConfig(sources=[DataSourceConfig(path="builtin:poetry")]),
                            batch_size=2, seq_len=16, seed=0)


def test_token_ids_outside_the_vocabulary_are_reported(tmp_path: Path) -> None:
    write_array_record(tmp_path / "big.arrayrecord", [[5, 6, 99999]])
    cfg = DataConfig(sources=[DataSourceConfig(path=str(tmp_path / "big.arrayrecord"))])
    with pytest.raises(DataError, match="99999.*vocabulary of 4096"):
        next(make_batch_iterator(cfg, batch_size=1, seq_len=8, seed=0))


def test_data_config_validation_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"data\.sources\[1\]\.weight"):
        config_from_dict({"data": {"sources": [{"path": "builtin:prose"}, {"path": "x.jsonl", "weight": -1}]}})
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.format"):
        config_from_dict({"data": {"sources": [{"path": "x", "format": "csv"}]}})
    with pytest.raises(ConfigError, match="pack_mode"):
        config_from_dict({"data": {"pack_mode": "zip"}})
    with pytest.raises(ConfigError, match="split"):
        make_batch_iterator(DataConfig(), split="test", batch_size=2, seq_len=16, seed=0)


def test_prefetch_keeps_batches_and_exact_resume(builtin_cfg: DataConfig, tmp_path: Path) -> None:
    from nemojax.data.prefetch import Prefetch

    plain = make_batch_iterator(builtin_cfg, batch_size=4, seq_len=32, seed=2)
    want = [next(plain)["input_ids"] for _ in range(10)]
    pf = Prefetch(make_batch_iterator(builtin_cfg, batch_size=4, seq_len=32, seed=2), depth=3)
    got = [next(pf)["input_ids"] for _ in range(6)]
    state = pf.get_state()  # the worker is already further ahead; the state must not be
    fresh = make_batch_iterator(builtin_cfg, batch_size=4, seq_len=32, seed=2)
    fresh.set_state(state)
    np.testing.assert_array_equal(next(fresh)["input_ids"], want[6])
    pf.close()  # stopping and going on loses nothing
    got += [next(pf)["input_ids"] for _ in range(4)]
    np.testing.assert_array_equal(np.stack(got), np.stack(want))
    pf.close()
    # Errors raised in the worker surface in the consumer (a document with ids outside the
    # vocabulary is found when it is read, after the first batch), at the last good state.
    write_array_record(tmp_path / "bad.arrayrecord", [[5, 6, 7, 8, 9, 10, 11]] + [[5, 99999]] * 3)
    bad = make_batch_iterator(DataConfig(sources=[DataSourceConfig(path=str(tmp_path / "bad.arrayrecord"))],
                                         validation_fraction=0.0), batch_size=1, seq_len=9, seed=0)
    bad.streams[0].order = [0, 1, 2, 3]  # the good document first
    pf = Prefetch(bad, depth=2)
    assert next(pf)["input_ids"].tolist() == [[BOS, 5, 6, 7, 8, 9, 10, 11, EOS]]
    good = pf.get_state()
    with pytest.raises(DataError, match="99999.*vocabulary"):
        next(pf)
    assert pf.get_state() == good == bad.get_state()


def test_pad_mode_pipeline_invariants() -> None:
    it = make_batch_iterator(DataConfig(pack_mode="pad"), batch_size=8, seq_len=512, seed=0)
    b = next(it)
    _check_rows(b)
    # Rows end in padding where the next document did not fit; no document starts mid-row
    # unless it is whole in that row (each non-first segment ends with eos).
    seg, ids = b["segment_ids"], b["input_ids"]
    assert (seg == 0).any()
    for r in range(seg.shape[0]):
        for s in range(2, seg[r].max() + 1):
            assert ids[r][seg[r] == s][-1] == EOS


@pytest.mark.parametrize("materialize", [True, False])
def test_epoch_shuffle_is_a_fresh_permutation_each_epoch(materialize: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import grain

    from nemojax.data import shuffle

    if not materialize:  # the large-dataset path (grain's index shuffle)
        monkeypatch.setattr(shuffle, "MAX_MATERIALIZED", 0)
    ds = shuffle.EpochShuffle(grain.MapDataset.source(list(range(100, 150))), seed=3)
    epochs = [[ds[e * 50 + j] for j in range(50)] for e in range(3)]
    assert all(sorted(ep) == list(range(100, 150)) for ep in epochs)
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(100, 150))
    again = shuffle.EpochShuffle(grain.MapDataset.source(list(range(100, 150))), seed=3)
    assert [again[k] for k in range(150)] == sum(epochs, [])


# ---------------------------------------------------------------------------- stages (continued pretraining)


def _row_sources(ids: np.ndarray) -> np.ndarray:
    """The source of each row of marked documents: its real tokens // 1000 (100+ -> 0, 1000+ -> 1, ...)."""
    return np.array([int(r[(r != EOS) & (r != BOS) & (r != 0)][0]) // 1000 for r in ids])


def _first_rows_by_source(it: BatchIterator, n_batches: int) -> dict[int, list[np.ndarray]]:
    """{source (a=0, b=1, c=2): its rows' input_ids, in stream order} over the next n_batches batches."""
    rows = _collect_rows(it, n_batches)["input_ids"]
    out: dict[int, list[np.ndarray]] = {}
    for i, r in zip(_row_sources(rows), rows):
        out.setdefault(i, []).append(r)
    return out


def test_new_stage_continues_each_source_where_the_last_run_stopped(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    write_array_record(tmp_path / "a.arrayrecord", _marked_docs(40, 100, rng))
    write_array_record(tmp_path / "b.arrayrecord", _marked_docs(40, 1000, rng))
    write_array_record(tmp_path / "c.arrayrecord", _marked_docs(40, 2000, rng))
    src = {k: DataSourceConfig(path=str(tmp_path / f"{k}.arrayrecord")) for k in "abc"}
    stage1 = DataConfig(sources=[dataclasses_replace(src["a"], weight=0.7), dataclasses_replace(src["b"], weight=0.3)],
                        validation_fraction=0.0)
    it1 = make_batch_iterator(stage1, batch_size=4, seq_len=16, seed=0)
    first1 = _first_rows_by_source(it1, 5)
    saved = json.loads(json.dumps(it1.get_state()))
    upcoming = _first_rows_by_source(it1, 5)  # what stage 1 would have read next, per source
    # Stage 2: a new blend (b reweighted, c new, a dropped), same seed.
    stage2 = DataConfig(sources=[dataclasses_replace(src["b"], weight=0.5), dataclasses_replace(src["c"], weight=0.5)],
                        validation_fraction=0.0)
    it2 = make_batch_iterator(stage2, batch_size=4, seq_len=16, seed=0)
    notes = it2.continue_from(saved, "continue")
    assert "continues where the previous run stopped" in notes[0] and "new to the blend" in notes[1]
    got = _first_rows_by_source(it2, 5)
    n = min(len(got[1]), len(upcoming[1]))
    assert n >= 3
    np.testing.assert_array_equal(np.stack(got[1][:n]), np.stack(upcoming[1][:n]))  # b: no replay
    assert not np.array_equal(got[1][0], first1[1][0])
    # resuming the new stage is exact (its state records b's adopted order and position)
    state2 = it2.get_state()
    more = next(it2)
    again = make_batch_iterator(stage2, batch_size=4, seq_len=16, seed=0)
    again.set_state(state2)
    np.testing.assert_array_equal(next(again)["input_ids"], more["input_ids"])
    # reshuffle: refused with the previous run's seed, a fresh order with another one
    with pytest.raises(ConfigError, match="data.stage_start=reshuffle.*same order"):
        make_batch_iterator(stage2, batch_size=4, seq_len=16, seed=0).continue_from(saved, "reshuffle")
    it3 = make_batch_iterator(stage2, batch_size=4, seq_len=16, seed=1)
    assert "reshuffled" in it3.continue_from(saved, "reshuffle")[0]


def dataclasses_replace(src: DataSourceConfig, **kw) -> DataSourceConfig:
    import dataclasses

    return dataclasses.replace(src, **kw)


def test_seed_sets_the_data_order_unless_shuffle_seed_pins_it() -> None:
    assert load_config_over(["seed=7"]).data_seed == 7
    assert load_config_over(["seed=7", "data.shuffle_seed=3"]).data_seed == 3
    with pytest.raises(ConfigError, match="shuffle_seed"):
        load_config_over(["data.shuffle_seed=-2"])
    with pytest.raises(ConfigError, match="stage_start"):
        load_config_over(["data.stage_start=replay"])


def load_config_over(over: list[str]):
    from nemojax.config import load_config

    return load_config("tiny", over)
