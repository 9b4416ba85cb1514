"""The pretraining input pipeline: read -> split -> shard -> shuffle -> tokenize -> pack -> blend.

Per source, grain does the document-level work by index arithmetic (no data is touched
until needed): `MapDataset.source(document indices of this split)`, sliced to this host's
share (`[process_index::process_count]`, disjoint and covering), shuffled from the seed
(a fresh permutation each epoch, repeated forever: nemojax.data.shuffle), then read and
tokenized in blocks (`batch` with a tokenizing batch_fn).
Each source is packed into rows separately (nemojax.data.packing) and the rows are
blended by weight: row k goes to the source furthest behind its share (as Megatron's
BlendableDataset does), so the proportions hold to within one row at every point.

State. The whole position of the stream is, per source, (document index, token offset,
rows emitted): a few integers. `get_state()` returns them as a JSON-ready dict; a fresh
iterator given that state via `set_state()` continues with exactly the next row, whatever
its batch size, so batch ramp-up and resume after preemption need nothing else. The state
is per host (each host packs its own shard); save each process's state.

Validation iterators cycle over the validation documents in a fixed order (independent of
the training seed), so "the first N batches" are the same evaluation set in every run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grain
import numpy as np

from nemojax.config import ConfigError, DataConfig, DataSourceConfig
from nemojax.data.packing import Cursor, empty_rows, pack_row
from nemojax.data.shuffle import EpochShuffle
from nemojax.data.sources import DataError, TokenArraySource, infer_format, open_files
from nemojax.data.tokenizer import Tokenizer, load_tokenizer

SPLITS = ("train", "validation")
STATE_VERSION = 1
# Documents read (and tokenized) together; big enough to amortise tokenizer calls, small
# enough that a resume reads little it will not use.
READ_BLOCK = 64
_VALIDATION_SEED = 0x5EED


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


@dataclass
class _Stream:
    """One source's documents, in this host's order, as token arrays: doc k -> ids."""

    label: str
    weight: float
    blocks: grain.MapDataset  # element b = token arrays of documents b*READ_BLOCK ...
    docs_per_epoch: int
    _cached: tuple[int, list[np.ndarray]] | None = None

    def get_doc(self, k: int) -> np.ndarray:
        b, j = divmod(k, READ_BLOCK)
        if self._cached is None or self._cached[0] != b:
            self._cached = (b, self.blocks[b])
        return self._cached[1][j]


def _source_label(i: int, src: DataSourceConfig, group: str) -> str:
    return f"data.{group}[{i}] ({src.path})"


def _open_source(src: DataSourceConfig, label: str, tok: Tokenizer) -> tuple[Any, Callable[[Sequence[int]], list]]:
    """(indexable documents, fetch(indices) -> token arrays) for one source config."""
    fmt = infer_format(src.path) if src.format == "auto" else src.format
    if fmt == "builtin":
        from nemojax.data.token_cache import builtin_tokens

        name = src.path.split(":", 1)[1] if src.path.startswith("builtin:") else src.path
        try:
            docs: Any = builtin_tokens(name, tok)
        except ValueError as e:
            raise DataError(f"{label}: {e}") from None
    else:
        docs = open_files(src.path, fmt, src.text_field, label)
    if isinstance(docs, TokenArraySource) or fmt == "arrayrecord":
        vocab = tok.vocab_size

        def fetch(idx: Sequence[int]) -> list[np.ndarray]:
            out = [np.asarray(docs[int(i)], dtype=np.int32) for i in idx]
            for i, a in zip(idx, out):
                if a.size and (a.max() >= vocab or a.min() < 0):
                    raise DataError(f"{label}: document {int(i)} has token id {int(a.max())} outside the "
                                    f"tokenizer's vocabulary of {vocab}; it was tokenized with another model")
            return out
    else:
        def fetch(idx: Sequence[int]) -> list[np.ndarray]:
            ids = tok.encode_batch([docs[int(i)] for i in idx])
            return [np.asarray(x, dtype=np.int32) for x in ids]
    return docs, fetch


def _derive_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(json.dumps(parts).encode()).digest()[:4], "little")


def _build_stream(i: int, src: DataSourceConfig, group: str, *, split: str, holdout: float, seed: int,
                  process_index: int, process_count: int, tok: Tokenizer) -> _Stream | None:
    label = _source_label(i, src, group)
    docs, fetch = _open_source(src, label, tok)
    n = len(docs)
    if n == 0:
        raise DataError(f"{label}: the source holds no documents")
    indices = split_indices(n, split, holdout) if holdout > 0 else np.arange(n, dtype=np.int64)
    if len(indices) == 0:
        return None  # e.g. a one-document source has nothing to give validation
    if len(indices) < process_count:
        raise DataError(f"{label}: {len(indices)} {split} documents cannot be shared among {process_count} "
                        f"hosts; every host needs at least one (add data or lower validation_fraction)")
    ds = grain.MapDataset.source(indices)[process_index::process_count]
    per_epoch = len(ds)
    ds = EpochShuffle(ds, seed=_derive_seed(seed, group, i))  # infinite, reshuffled each epoch
    ds = ds.batch(READ_BLOCK, batch_fn=fetch)
    return _Stream(label=label, weight=float(src.weight), blocks=ds, docs_per_epoch=per_epoch)


# ---------------------------------------------------------------------------- the iterator


class BatchIterator:
    """Yields dicts of [local_batch, seq_len] numpy arrays; resumable via get/set_state.

    Keys: input_ids, targets, positions, segment_ids (int32) and loss_mask (float32).
    `local_batch = batch_size // process_count`: this host's share of the global batch.
    """

    def __init__(self, streams: list[_Stream], *, local_batch: int, seq_len: int, eos_id: int,
                 pack_mode: str, spec: dict[str, Any]) -> None:
        self.streams = streams
        self.local_batch = local_batch
        self.seq_len = seq_len
        self.eos_id = eos_id
        self.pack_mode = pack_mode
        self.spec = spec
        total = sum(s.weight for s in streams)
        self.weights = np.array([s.weight / total for s in streams])
        self.cursors = [Cursor() for _ in streams]
        self.rows_per_source = np.zeros(len(streams), np.int64)
        self.rows = 0

    def __iter__(self) -> BatchIterator:
        return self

    def _next_source(self) -> int:
        # The source furthest below its target share after this row (ties: lowest index).
        deficit = self.weights * (self.rows + 1) - self.rows_per_source
        return int(np.argmax(deficit))

    def __next__(self) -> dict[str, np.ndarray]:
        out = empty_rows(self.local_batch, self.seq_len)
        saved = (list(self.cursors), self.rows_per_source.copy(), self.rows)
        try:
            for r in range(self.local_batch):
                i = self._next_source()
                s = self.streams[i]
                self.cursors[i] = pack_row(s.get_doc, self.cursors[i], out, r, eos_id=self.eos_id,
                                           mode=self.pack_mode, max_empty=s.docs_per_epoch)
                self.rows_per_source[i] += 1
                self.rows += 1
        except BaseException:
            # A batch is all or nothing: the state stays at the last batch returned.
            self.cursors, self.rows_per_source, self.rows = saved
            raise
        return out

    def source_of_rows(self, n: int) -> list[int]:
        """Which source each of the next `n` rows will come from (does not advance)."""
        saved = (self.rows, self.rows_per_source.copy())
        picks = []
        for _ in range(n):
            i = self._next_source()
            picks.append(i)
            self.rows_per_source[i] += 1
            self.rows += 1
        self.rows, self.rows_per_source = saved
        return picks

    @property
    def tokens_consumed(self) -> int:
        """Row slots produced so far by this host (rows * seq_len)."""
        return self.rows * self.seq_len

    def get_state(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot: the stream position after the last batch returned."""
        return {
            "version": STATE_VERSION,
            "rows": int(self.rows),
            "sources": [{"doc": int(c.doc), "offset": int(c.offset), "rows": int(r)}
                        for c, r in zip(self.cursors, self.rows_per_source)],
            "spec": self.spec,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from a `get_state()` snapshot (the batch size may differ)."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise DataError(f"data iterator state has version {state.get('version') if isinstance(state, dict) else None}, "
                            f"expected {STATE_VERSION}: it was saved by an incompatible nemojax")
        old = state.get("spec", {})
        changed = sorted(k for k in set(old) | set(self.spec) if old.get(k) != self.spec.get(k))
        if changed:
            detail = "; ".join(f"{k}: saved {old.get(k)!r}, now {self.spec.get(k)!r}" for k in changed)
            raise DataError(f"cannot resume the data pipeline: its configuration changed ({detail}). "
                            f"Restore the old data settings, or start the data stream afresh")
        srcs = state["sources"]
        self.cursors = [Cursor(int(s["doc"]), int(s["offset"])) for s in srcs]
        self.rows_per_source = np.array([int(s["rows"]) for s in srcs], np.int64)
        self.rows = int(state["rows"])


def _spec(data_cfg: DataConfig, sources: Sequence[DataSourceConfig], *, split: str, seq_len: int, seed: int,
          holdout: float, process_index: int, process_count: int, tok: Tokenizer) -> dict[str, Any]:
    """What must not change between saving and restoring a state (batch size may)."""
    return {
        "split": split, "seq_len": seq_len, "seed": seed, "holdout": holdout,
        "process_index": process_index, "process_count": process_count,
        "pack_mode": data_cfg.pack_mode, "tokenizer": tok.fingerprint,
        "sources": [[s.path, s.format, s.weight, s.text_field] for s in sources],
    }


def make_batch_iterator(data_cfg: DataConfig, *, split: str = "train", batch_size: int, seq_len: int,
                        seed: int, process_index: int = 0, process_count: int = 1) -> BatchIterator:
    """The packed, blended, sharded batch stream for one host.

    batch_size is the global batch; this host gets `batch_size // process_count` rows per
    batch. `split="train"` reads data_cfg.sources (minus the held-out documents when
    data_cfg.validation is empty); `split="validation"` reads data_cfg.validation, or the
    held-out documents, and ignores `seed` so every run evaluates on the same rows.
    """
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is unknown; use 'train' or 'validation'")
    data_cfg.validate("data")
    if batch_size < 1 or seq_len < 2:
        raise ConfigError(f"batch_size ({batch_size}) must be >= 1 and seq_len ({seq_len}) >= 2")
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if batch_size % process_count:
        raise ConfigError(f"global batch size {batch_size} is not divisible by the {process_count} hosts; "
                          f"make data.global_batch_size (and every data.rampup batch_size) a multiple of it")
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
        st = _build_stream(i, src, group, split=split, holdout=holdout, seed=seed, process_index=process_index,
                           process_count=process_count, tok=tok)
        if st is not None:
            streams.append(st)
    if not streams:
        raise DataError(f"the {split} split has no documents: every source of data.{group} is empty or too "
                        f"small to hold out validation documents")
    spec = _spec(data_cfg, sources, split=split, seq_len=seq_len, seed=seed, holdout=holdout,
                 process_index=process_index, process_count=process_count, tok=tok)
    return BatchIterator(streams, local_batch=batch_size // process_count, seq_len=seq_len, eos_id=tok.eos_id,
                         pack_mode=data_cfg.pack_mode, spec=spec)
