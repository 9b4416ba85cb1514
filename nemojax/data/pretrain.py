"""The pretraining input pipeline: read -> split -> shuffle -> tokenize -> frame -> pack -> blend.

One global stream. The rows of every global batch are a pure function of the config, the seed
and the stream position -- never of the number of processes or the mesh -- so a run on one host
and the same run on 64 hosts train on exactly the same batches, and a checkpoint resumes with
any process count. Each process asks for the rows its devices hold (`rows=`, from
`nemojax.parallel.batching`): it walks the whole stream's *plan* (which document pieces make up
each row), which needs only document lengths, and reads and fills only its own rows.

Host-local reading. Every source file has a length index (nemojax.data.length_index: written
beside pre-tokenized files by `nemojax tokenizer encode`, beside text files by `nemojax tokenizer
index`, else built once and cached), so planning reads no document. A process then reads
(ArrayRecord) or tokenizes (JSONL / Parquet) only the documents of its own rows, once per batch
and source (nemojax.data.indexed_source): with data parallelism over P hosts each reads about
1/P of the batch's documents. `NEMOJAX_LOG_DATA_READS=1` prints what each batch read.

Per source, grain does the document-level work by index arithmetic: `MapDataset.source(document
indices of this split)`, shuffled from the seed (a fresh permutation each epoch, repeated forever:
nemojax.data.shuffle). Each document is framed `[bos] + tokens + [eos]` (the bos the model sees
before every prompt in `generate` / `serve`) and each source is packed into rows separately
(nemojax.data.packing); rows are blended by weight: row k goes to the source furthest behind
its share (as Megatron's BlendableDataset does), so the proportions hold to within one row at
every point. Why grain's own sharding, mixing and packing are not used: docs/DATA.md.

State. The whole position of the stream is, per source, (document index, token offset, rows
emitted, the seed of its order): a few integers, identical on every process. `get_state()`
returns them as a JSON-ready dict; a fresh iterator given that state via `set_state()`
continues with exactly the next row, whatever its batch size or row selection, so batch
ramp-up, resume after preemption and resume with a different process count need nothing else.
`continue_from()` starts a new stage (continued pretraining) where another run's stream stopped.

Validation iterators cycle over the validation documents in a fixed order (independent of
the training seed), so "the first N batches" are the same evaluation set in every run.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grain
import numpy as np

from nemojax.config import ConfigError, DataConfig, DataSourceConfig
from nemojax.data.indexed_source import IndexedSource, ReadCounts, open_source
from nemojax.data.packing import Cursor, Piece, empty_rows, fill_row, plan_row
from nemojax.data.shuffle import EpochShuffle
from nemojax.data.sources import DataError
from nemojax.data.tokenizer import Tokenizer, load_tokenizer

SPLITS = ("train", "validation")
STATE_VERSION = 2  # 2: one global stream, bos-framed documents, per-source order seeds
_VALIDATION_SEED = 0x5EED
# Set to 1 to print, per batch and process, what the pipeline read (documents, tokens, a digest
# of the rows it filled) on stderr: how host-local reading is observed in a multi-host run.
LOG_READS_ENV = "NEMOJAX_LOG_DATA_READS"


# ---------------------------------------------------------------------------- splitting


def _index_hash(idx: np.ndarray) -> np.ndarray:
    """splitmix64 of document indices: a fixed, well-mixed uint64 per index."""
    with np.errstate(over="ignore"):
        z = idx.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def split_indices(num_docs: int, split: str, fraction: float) -> np.ndarray:
    """Document indices of `split` when holding out `fraction` of a source for validation.

    A document is held out when the hash of its index falls in the lowest `fraction` of
    the hash range: deterministic, stable under any seed, and independent of other sources.
    A source with two or more documents always gives validation at least one (the one with
    the smallest hash); a one-document source stays entirely in training.
    """
    idx = np.arange(num_docs, dtype=np.int64)
    if fraction <= 0 or num_docs < 2:
        held = np.zeros(num_docs, bool)
    else:
        h = _index_hash(idx)
        held = h < np.uint64(min(fraction, 1.0) * 2.0**64 - 1)
        held[int(np.argmin(h))] = True
        if held.all():
            held[int(np.argmax(h))] = False
    return idx[held] if split == "validation" else idx[~held]


# ---------------------------------------------------------------------------- per-source streams


def source_key(src: DataSourceConfig) -> list[str]:
    """What identifies a source across runs and stages: path, format and text field."""
    return [src.path, src.format, src.text_field]


def _derive_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(json.dumps(parts).encode()).digest()[:4], "little")


def source_identity(src: DataSourceConfig, num_docs: int) -> list[Any]:
    """What a source is wherever it lives: its file name, format, text field and document count.

    It seeds the source's order, so the same file copied, moved or mounted elsewhere (another run
    directory, another host's mount point) is read in the same order and a run reproduces wherever
    its data lives; and a saved position finds its source by it when the path changed. Two files
    of one name and length (shards `en/part-0`, `de/part-0`) share it: their orders are the same
    permutation of their own documents, and a moved blend of them resumes by position.
    """
    return [Path(src.path.rstrip("/")).name, src.format, src.text_field, int(num_docs)]


def _order_seed(seed: int, group: str, identity: list[Any]) -> int:
    """Seed of one source's document order: from the data seed and the source's identity (not its
    position in the blend, so reordering or extending a blend keeps every source's order)."""
    return _derive_seed(seed, group, *identity)


@dataclass
class _Stream:
    """One source's documents in stream order (k = 0, 1, ... over epochs): lengths and tokens."""

    label: str
    key: list[str]  # source_key: the path as configured
    identity: list[Any]  # source_identity: the same wherever the file lives
    weight: float
    indices: np.ndarray  # document ids of this split
    source: IndexedSource  # lengths of every document; tokens of the ones read
    seed: int
    order: EpochShuffle = field(init=False)

    def __post_init__(self) -> None:
        self.reseed(self.seed)

    def reseed(self, seed: int) -> None:
        self.seed = int(seed)
        self.order = EpochShuffle(grain.MapDataset.source(self.indices), seed=self.seed)  # infinite

    @property
    def docs_per_epoch(self) -> int:
        return len(self.indices)

    def doc_id(self, k: int) -> int:
        return int(self.order[k])

    def doc_len(self, k: int) -> int:
        return int(self.source.lengths[self.doc_id(k)])


def _source_label(i: int, src: DataSourceConfig, group: str) -> str:
    return f"data.{group}[{i}] ({src.path})"


def _build_stream(i: int, src: DataSourceConfig, group: str, *, split: str, holdout: float, seed: int,
                  tok: Tokenizer) -> _Stream | None:
    label = _source_label(i, src, group)
    source = open_source(src.path, src.format, src.text_field, tok, label)
    n = len(source)
    if n == 0:
        raise DataError(f"{label}: the source holds no documents")
    indices = split_indices(n, split, holdout) if holdout > 0 else np.arange(n, dtype=np.int64)
    if len(indices) == 0:
        return None  # e.g. a one-document source has nothing to give validation
    identity = source_identity(src, n)
    return _Stream(label=label, key=source_key(src), identity=identity, weight=float(src.weight), indices=indices,
                   source=source, seed=_order_seed(seed, group, identity))


# ---------------------------------------------------------------------------- the iterator


class BatchIterator:
    """Yields this process' rows of each global batch as dicts of `[len(rows), seq_len]` arrays.

    Keys: input_ids, targets, positions, segment_ids (int32) and loss_mask (float32). `rows` are
    indices into the global batch of `batch_size` rows (default: all of them), any subset in
    any order; the arrays hold them in that order. Resumable via get_state / set_state.
    """

    def __init__(self, streams: list[_Stream], *, batch_size: int, rows: Sequence[int] | None, seq_len: int,
                 eos_id: int, bos_id: int | None, pack_mode: str, spec: dict[str, Any]) -> None:
        self.streams = streams
        self.batch_size = batch_size
        self.rows_wanted = np.arange(batch_size) if rows is None else np.asarray(rows, np.int64)
        if self.rows_wanted.size and (self.rows_wanted.min() < 0 or self.rows_wanted.max() >= batch_size):
            raise ConfigError(f"rows {self.rows_wanted.tolist()} are not all in the global batch of {batch_size}")
        self._slot = {int(r): j for j, r in enumerate(self.rows_wanted)}
        self.seq_len = seq_len
        self.eos_id = eos_id
        self.bos_id = bos_id
        self.pack_mode = pack_mode
        self.spec = spec
        total = sum(s.weight for s in streams)
        self.weights = np.array([s.weight / total for s in streams])
        self.cursors = [Cursor() for _ in streams]
        self.rows_per_source = np.zeros(len(streams), np.int64)
        self.rows = 0
        # Documents read by the last batch that the next one may continue (the one at a cursor).
        self._carry: list[dict[int, np.ndarray]] = [{} for _ in streams]
        self.batches = 0
        self._log_reads = os.environ.get(LOG_READS_ENV, "") not in ("", "0")

    def __iter__(self) -> BatchIterator:
        return self

    def _next_source(self) -> int:
        # The source furthest below its target share after this row (ties: lowest index).
        deficit = self.weights * (self.rows + 1) - self.rows_per_source
        return int(np.argmax(deficit))

    def reads(self) -> ReadCounts:
        """What this iterator's sources read for rows so far (documents, tokenized, tokens)."""
        total = ReadCounts()
        for s in self.streams:
            total.add(s.source.counts)
        return total

    def __next__(self) -> dict[str, np.ndarray]:
        out = empty_rows(len(self.rows_wanted), self.seq_len)
        saved = (list(self.cursors), self.rows_per_source.copy(), self.rows)
        before = self.reads()
        bos = self.bos_id is not None
        try:
            # Plan every row of the global batch from lengths; keep the plans of this process' rows.
            mine: list[tuple[int, int, list[Piece]]] = []
            for r in range(self.batch_size):
                i = self._next_source()
                s = self.streams[i]
                pieces, self.cursors[i] = plan_row(s.doc_len, self.cursors[i], self.seq_len, bos=bos,
                                                   mode=self.pack_mode, max_empty=s.docs_per_epoch)
                slot = self._slot.get(r)
                if slot is not None:
                    mine.append((slot, i, pieces))
                self.rows_per_source[i] += 1
                self.rows += 1
            tokens = self._read(mine)
            for slot, i, pieces in mine:
                fill_row(tokens[i].__getitem__, pieces, out, slot, eos_id=self.eos_id, bos_id=self.bos_id)
        except BaseException:
            # A batch is all or nothing: the state stays at the last batch returned.
            self.cursors, self.rows_per_source, self.rows = saved
            raise
        self._carry = [{k: v for k, v in t.items() if k >= c.doc} for t, c in zip(tokens, self.cursors)]
        self.batches += 1
        if self._log_reads:
            self._log_batch(out, before)
        return out

    def _read(self, mine: list[tuple[int, int, list[Piece]]]) -> list[dict[int, np.ndarray]]:
        """{stream position k: tokens} per source, for the documents of this process' rows only
        (one read per source and batch, so text is tokenized in one call)."""
        needed: list[set[int]] = [set() for _ in self.streams]
        for _, i, pieces in mine:
            needed[i].update(p.doc for p in pieces)
        tokens: list[dict[int, np.ndarray]] = []
        for s, want, carry in zip(self.streams, needed, self._carry):
            have = {k: carry[k] for k in want if k in carry}
            missing = sorted(want - set(have))
            have.update(zip(missing, s.source.read([s.doc_id(k) for k in missing])))
            tokens.append(have)
        return tokens

    def _log_batch(self, out: dict[str, np.ndarray], before: ReadCounts) -> None:
        now = self.reads()
        digest = hashlib.sha256(b"".join(np.ascontiguousarray(out[k]).tobytes() for k in sorted(out)))
        print(f"nemojax data reads: split={self.spec['split']} batch={self.batches} "
              f"rows={len(self.rows_wanted)}/{self.batch_size} documents={now.documents - before.documents} "
              f"tokenized={now.tokenized - before.tokenized} tokens={now.tokens - before.tokens} "
              f"total_documents={now.documents} total_tokenized={now.tokenized} rows_sha256={digest.hexdigest()[:16]}",
              file=sys.stderr, flush=True)

    def get_state(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot: the stream position after the last batch returned."""
        return {
            "version": STATE_VERSION,
            "rows": int(self.rows),
            "sources": [{"source": s.key, "identity": s.identity, "weight": s.weight, "seed": s.seed, "doc": int(c.doc),
                         "offset": int(c.offset), "rows": int(r)}
                        for s, c, r in zip(self.streams, self.cursors, self.rows_per_source)],
            "spec": self.spec,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from a `get_state()` snapshot (the batch size and row selection may differ)."""
        version = state.get("version") if isinstance(state, dict) else None
        if version != STATE_VERSION:
            raise DataError(f"the saved data-stream position has version {version}, this nemojax reads "
                            f"{STATE_VERSION} (one global stream, bos-framed documents): it was saved by an "
                            f"older nemojax. Start a new run from those weights with init_from=<that run_dir>")
        old = state.get("spec", {})
        changed = sorted(k for k in set(old) | set(self.spec) if old.get(k) != self.spec.get(k))
        saved_src = [[x["source"], x["weight"]] for x in state["sources"]]
        mine = [[s.key, s.weight] for s in self.streams]
        if len(saved_src) != len(mine) or not all(
                x["weight"] == s.weight and (x["source"] == s.key or x.get("identity") == s.identity)
                for x, s in zip(state["sources"], self.streams)):  # same file moved: found by its identity
            changed.append(f"sources: saved {saved_src!r}, now {mine!r}")
        if changed:
            detail = "; ".join(c if c.startswith("sources:") else f"{c}: saved {old.get(c)!r}, now {self.spec.get(c)!r}"
                               for c in changed)
            raise DataError(f"cannot resume the data pipeline: its configuration changed ({detail}). "
                            f"Restore the old data settings, or start a new stage from this run with "
                            f"init_from=<run_dir> (data.stage_start decides whether its stream continues)")
        for s, x in zip(self.streams, state["sources"]):
            if int(x["seed"]) != s.seed:
                s.reseed(int(x["seed"]))
        self._carry = [{} for _ in self.streams]
        self.cursors = [Cursor(int(x["doc"]), int(x["offset"])) for x in state["sources"]]
        self.rows_per_source = np.array([int(x["rows"]) for x in state["sources"]], np.int64)
        self.rows = int(state["rows"])

    def continue_from(self, previous: dict[str, Any], mode: str = "continue") -> list[str]:
        """Start a new stage relative to another run's stream state (`data.stage_start`).

        continue: each of this blend's sources that the previous run also read (same path, format
        and text field, or the same file moved: `source_identity`; same tokenizer, split and
        hold-out) adopts that run's order and position; blend counters start afresh. reshuffle:
        keep this stage's own orders, but refuse (ConfigError) any source whose order equals the
        previous run's. Returns a line per source saying what happened, for the log.
        """
        if not isinstance(previous, dict) or previous.get("version") != STATE_VERSION:
            return [f"{s.label}: starts at its beginning (the previous run's data position is from an "
                    f"older nemojax)" for s in self.streams]
        old_spec = previous.get("spec", {})
        same_docs = all(old_spec.get(k) == self.spec.get(k) for k in ("split", "holdout", "tokenizer", "bos"))
        prev = {json.dumps(x["source"]): x for x in previous.get("sources", [])}
        moved = {json.dumps(x["identity"]): x for x in previous.get("sources", []) if "identity" in x}
        self._carry = [{} for _ in self.streams]
        notes = []
        for i, s in enumerate(self.streams):
            x = prev.get(json.dumps(s.key)) or moved.get(json.dumps(s.identity))
            if x is None:
                notes.append(f"{s.label}: new to the blend, starts at its beginning")
            elif mode == "reshuffle":
                if int(x["seed"]) == s.seed:
                    raise ConfigError(
                        f"data.stage_start=reshuffle: {s.label} would be read in the same order as the run "
                        f"this stage starts from (same shuffle seed), replaying the documents it saw first; "
                        f"set data.shuffle_seed (or seed) to a different value, or use data.stage_start=continue")
                notes.append(f"{s.label}: reshuffled with this stage's seed")
            elif not same_docs:
                notes.append(f"{s.label}: starts at its beginning (the previous run used another tokenizer or "
                             f"validation split, so its position does not apply)")
            else:
                s.reseed(int(x["seed"]))
                self.cursors[i] = Cursor(int(x["doc"]), int(x["offset"]))
                epoch, k = divmod(int(x["doc"]), s.docs_per_epoch)
                notes.append(f"{s.label}: continues where the previous run stopped (epoch {epoch}, document "
                             f"{k} of {s.docs_per_epoch})")
        return notes


def _spec(data_cfg: DataConfig, sources: Sequence[DataSourceConfig], *, split: str, seq_len: int, seed: int,
          holdout: float, tok: Tokenizer, bos: bool) -> dict[str, Any]:
    """What must not change between saving and restoring a state (batch size and rows may)."""
    return {
        "split": split, "seq_len": seq_len, "seed": seed, "holdout": holdout, "bos": bos,
        "pack_mode": data_cfg.pack_mode, "tokenizer": tok.fingerprint,
    }


def make_batch_iterator(data_cfg: DataConfig, *, split: str = "train", batch_size: int, seq_len: int,
                        seed: int, rows: Sequence[int] | None = None) -> BatchIterator:
    """The packed, blended batch stream, yielding the given `rows` of each global batch.

    batch_size is the global batch; `rows` (default: all) are the row indices this process
    supplies (nemojax.train.build.Training.rows). `split="train"` reads data_cfg.sources (minus
    the held-out documents when data_cfg.validation is empty); `split="validation"` reads
    data_cfg.validation, or the held-out documents, and ignores `seed` so every run evaluates
    on the same rows.
    """
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is unknown; use 'train' or 'validation'")
    data_cfg.validate("data")
    if batch_size < 1 or seq_len < 2:
        raise ConfigError(f"batch_size ({batch_size}) must be >= 1 and seq_len ({seq_len}) >= 2")
    tok = load_tokenizer(data_cfg.tokenizer)
    separate_validation = bool(data_cfg.validation)
    if split == "validation" and separate_validation:
        sources, group, holdout = data_cfg.validation, "validation", 0.0
    else:
        sources, group = data_cfg.sources, "sources"
        holdout = 0.0 if separate_validation else data_cfg.validation_fraction
        if split == "validation" and holdout <= 0:
            raise ConfigError("no validation data: data.validation is empty and data.validation_fraction is 0; "
                              "set one of them")
    if split == "validation":
        seed = _VALIDATION_SEED
    streams = []
    for i, src in enumerate(sources):
        if src.weight <= 0:
            continue
        st = _build_stream(i, src, group, split=split, holdout=holdout, seed=seed, tok=tok)
        if st is not None:
            streams.append(st)
    if not streams:
        raise DataError(f"the {split} split has no documents: every source of data.{group} is empty or too "
                        f"small to hold out validation documents")
    spec = _spec(data_cfg, sources, split=split, seq_len=seq_len, seed=seed, holdout=holdout, tok=tok, bos=True)
    return BatchIterator(streams, batch_size=batch_size, rows=rows, seq_len=seq_len, eos_id=tok.eos_id,
                         bos_id=tok.bos_id, pack_mode=data_cfg.pack_mode, spec=spec)
