"""Length indexes: every document's token count, stored once per source file.

Why. The rows of the global pretraining stream are planned from document lengths alone
(nemojax.data.packing.plan_row); only the documents of a process' own rows need their tokens.
So every process reads the small length index of each source, and reads (ArrayRecord) or
tokenizes (JSONL / Parquet) only the documents of its rows. Without an index, learning a
length means tokenizing the document, and every host would tokenize the whole global batch.

Where. An index describes one file:
- `F.lenidx` beside a pre-tokenized ArrayRecord file F, written with it by
  `write_array_record` (so by `nemojax tokenizer encode`);
- `F.<tokenizer fingerprint>.lenidx` beside a JSONL / Parquet file F, written by
  `nemojax tokenizer index` (an explicit step, e.g. before a multi-host launch);
- otherwise built on first use and cached in `$NEMOJAX_CACHE_DIR/lengths/` under a name made
  of the file's content hash, its format, text field and the tokenizer's fingerprint, so a
  copy of the same file anywhere (or on any host sharing the cache) finds it. Building costs
  one full pass over the file: reading every record (ArrayRecord) or parsing and tokenizing
  every document (JSONL / Parquet, SentencePiece on all cores), once per file and tokenizer.

Validity. An index records the file's size and SHA-256; it is used only for a file with that
content (the hash of a file is computed once per host and remembered by path, size, mtime and
inode in the cache, so an unchanged file is never hashed twice), and for text files only with
the same text field and tokenizer. A stale index beside a file is reported and ignored.
Readers also check every document they read against its indexed length.

Format: 8 bytes magic, 8 bytes little-endian header length, a JSON header, then raw
little-endian arrays at 64-byte aligned offsets named in the header (memory-mapped on load):
`lengths` (int32 token counts) and, for JSONL, `starts` / `ends` (int64 byte ranges of the
document lines, so opening the file needs no newline scan).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nemojax.data.sources import INDEX_SUFFIX as SUFFIX
from nemojax.data.sources import ArrayRecordFile, DataError, JsonlFile, ParquetFile, cache_dir

MAGIC = b"NJXLIDX1"
VERSION = 1
ALIGN = 64
_BUILD_BLOCK = 1024  # documents tokenized per SentencePiece call while building


@dataclass(frozen=True)
class LengthIndex:
    """Token counts of one file's documents (and, for JSONL, their byte ranges)."""

    lengths: np.ndarray  # int32 [documents]
    spans: tuple[np.ndarray, np.ndarray] | None  # JSONL (starts, ends) byte offsets
    where: str  # the index file it came from, or "built in memory"


# ---------------------------------------------------------------------------- file format


def write_index(path: Path, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Write an index file atomically (write, fsync, rename): readers never see half of one."""
    layout, offset = {}, 0
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        layout[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": offset}
        offset += -(-a.nbytes // ALIGN) * ALIGN
    head = json.dumps({**header, "version": VERSION, "arrays": layout}).encode()
    start = -(-(len(MAGIC) + 8 + len(head)) // ALIGN) * ALIGN
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        f.write(MAGIC + len(head).to_bytes(8, "little") + head)
        for name, a in arrays.items():
            f.seek(start + layout[name]["offset"])
            f.write(np.ascontiguousarray(a).tobytes())
        f.truncate(start + offset)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_index(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(header, {name: memory-mapped array}) of an index file; DataError if it is not one."""
    try:
        with path.open("rb") as f:
            magic, size = f.read(len(MAGIC)), int.from_bytes(f.read(8), "little")
            if magic != MAGIC or not 0 < size < 1 << 24:
                raise DataError(f"{path}: not a nemojax length index (bad magic)")
            header = json.loads(f.read(size))
        if header.get("version") != VERSION:
            raise DataError(f"{path}: length index version {header.get('version')}, this nemojax reads {VERSION}")
        start = -(-(len(MAGIC) + 8 + size) // ALIGN) * ALIGN
        arrays = {}
        for name, a in header["arrays"].items():
            shape = tuple(a["shape"])
            arrays[name] = (np.memmap(path, np.dtype(a["dtype"]), "r", start + a["offset"], shape)
                            if np.prod(shape) else np.zeros(shape, np.dtype(a["dtype"])))
        return header, arrays
    except (OSError, ValueError, KeyError, TypeError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: unreadable length index ({e}); delete it to rebuild") from None


# ---------------------------------------------------------------------------- content hashes

_sha_memo: dict[tuple, str] = {}
# Files at least this big have their hash remembered on disk too (hashing runs at ~1 GB/s;
# smaller files are rehashed in each new process rather than leaving a cache entry).
MEMO_MIN_BYTES = 1 << 26


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, computed once per (path, size, mtime, inode) on this host."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key in _sha_memo:
        return _sha_memo[key]
    memo = cache_dir() / "lengths" / "sha256" / hashlib.sha256(repr(key).encode()).hexdigest()[:32]
    digest = ""
    if st.st_size >= MEMO_MIN_BYTES:
        try:
            digest = memo.read_text().strip()
        except OSError:
            pass
    if len(digest) != 64:
        h = hashlib.sha256()
        with path.open("rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
        digest = h.hexdigest()
        if st.st_size >= MEMO_MIN_BYTES:
            _try_write(memo, digest.encode())
    _sha_memo[key] = digest
    return digest


def _try_write(path: Path, data: bytes) -> None:
    """Best-effort cache write (a read-only cache only costs recomputation)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        _log(f"cannot write the cache file {path} ({e}); set NEMOJAX_CACHE_DIR to a writable directory")


# ---------------------------------------------------------------------------- identity and lookup


def source_identity(path: Path, fmt: str, text_field: str, tokenizer: str | None) -> dict[str, Any]:
    """What an index must match: the file's content and, for text, how it is tokenized."""
    ident: dict[str, Any] = {"size": path.stat().st_size, "sha256": file_sha256(path), "format": fmt}
    if fmt != "arrayrecord":
        ident.update(text_field=text_field, tokenizer=tokenizer)
    return ident


def beside_path(path: Path, fmt: str, tokenizer: str | None) -> Path:
    """Where an index kept beside `path` lives (text indexes are per tokenizer)."""
    return path.with_name(path.name + (SUFFIX if fmt == "arrayrecord" else f".{tokenizer}{SUFFIX}"))


def cached_path(ident: dict[str, Any]) -> Path:
    return cache_dir() / "lengths" / (hashlib.sha256(json.dumps(ident, sort_keys=True).encode())
                                      .hexdigest()[:32] + SUFFIX)


def _load_matching(path: Path, ident: dict[str, Any], *, warn: bool) -> LengthIndex | None:
    if not path.is_file():
        return None
    try:
        header, arrays = read_index(path)
    except DataError as e:
        if warn:
            _log(f"ignoring {e}")
        return None
    if header.get("source") != ident or "lengths" not in arrays:
        if warn:
            _log(f"ignoring the stale length index {path}: it describes {header.get('source')}, the file now "
                 f"is {ident}; rebuild it with `nemojax tokenizer index` (or delete it)")
        return None
    spans = (arrays["starts"], arrays["ends"]) if "starts" in arrays else None
    return LengthIndex(arrays["lengths"], spans, str(path))


def save_index(path: Path, ident: dict[str, Any], index: LengthIndex) -> None:
    arrays = {"lengths": np.asarray(index.lengths, np.int32)}
    if index.spans is not None:
        arrays.update(starts=np.asarray(index.spans[0], np.int64), ends=np.asarray(index.spans[1], np.int64))
    write_index(path, {"source": ident, "documents": int(len(index.lengths))}, arrays)


def length_index(path: Path, fmt: str, text_field: str, tokenizer: Any, label: str) -> LengthIndex:
    """The length index of one source file: beside it, else cached, else built now (and cached).

    `tokenizer` (a nemojax Tokenizer) tokenizes text files; pre-tokenized files ignore it.
    """
    fp = None if fmt == "arrayrecord" else tokenizer.fingerprint
    ident = source_identity(path, fmt, text_field, fp)
    found = _load_matching(beside_path(path, fmt, fp), ident, warn=True)
    cached = cached_path(ident)
    found = found or _load_matching(cached, ident, warn=False)
    if found is not None:
        return found
    t0 = time.perf_counter()
    what = "reading every record" if fmt == "arrayrecord" else "tokenizing every document"
    _log(f"{label}: building the length index of {path} ({what}, once per file"
         f"{'' if fmt == 'arrayrecord' else ' and tokenizer'}; run `nemojax tokenizer index` beforehand to skip this)")
    index = build_index(path, fmt, text_field, tokenizer)
    save_index(cached, ident, index)
    _log(f"{label}: indexed {len(index.lengths):,} documents, {int(np.sum(index.lengths, dtype=np.int64)):,} "
         f"tokens in {time.perf_counter() - t0:.1f}s; cached at {cached}")
    return LengthIndex(index.lengths, index.spans, str(cached))


# ---------------------------------------------------------------------------- building


def build_index(path: Path, fmt: str, text_field: str, tokenizer: Any,
                progress: Callable[[int], None] | None = None) -> LengthIndex:
    """Measure every document of one file (a full read; a full tokenization for text)."""
    if fmt == "arrayrecord":
        f = ArrayRecordFile(path)
        lengths = np.zeros(len(f), np.int32)
        for lo in range(0, len(f), _BUILD_BLOCK):
            lengths[lo:lo + _BUILD_BLOCK] = [len(d) for d in f.read_many(range(lo, min(lo + _BUILD_BLOCK, len(f))))]
            if progress:
                progress(min(lo + _BUILD_BLOCK, len(f)))
        return LengthIndex(lengths, None, "built in memory")
    if fmt == "jsonl":
        docs: Any = JsonlFile(path, text_field)
    elif fmt == "parquet":
        docs = ParquetFile(path, text_field)
    else:
        raise DataError(f"{path}: no length index for format {fmt!r}")
    lengths = np.zeros(len(docs), np.int32)
    for lo in range(0, len(docs), _BUILD_BLOCK):
        hi = min(lo + _BUILD_BLOCK, len(docs))
        lengths[lo:hi] = [len(x) for x in tokenizer.encode_batch([docs[i] for i in range(lo, hi)])]
        if progress:
            progress(hi)
    return LengthIndex(lengths, docs.spans() if fmt == "jsonl" else None, "built in memory")


def write_beside(path: Path, fmt: str, text_field: str, tokenizer: Any,
                 progress: Callable[[int], None] | None = None) -> tuple[Path, LengthIndex]:
    """Build the index of one file and keep it beside the file (`nemojax tokenizer index`)."""
    fp = None if fmt == "arrayrecord" else tokenizer.fingerprint
    ident = source_identity(path, fmt, text_field, fp)
    index = build_index(path, fmt, text_field, tokenizer, progress)
    out = beside_path(path, fmt, fp)
    save_index(out, ident, index)
    return out, LengthIndex(index.lengths, index.spans, str(out))


def index_token_file(path: Path, lengths: Sequence[int] | np.ndarray) -> Path:
    """Keep the index of a just-written ArrayRecord file beside it (lengths known from writing)."""
    path = Path(path)
    ident = source_identity(path, "arrayrecord", "", None)
    out = beside_path(path, "arrayrecord", None)
    save_index(out, ident, LengthIndex(np.asarray(lengths, np.int32), None, str(out)))
    return out


def concat_lengths(parts: Iterable[np.ndarray]) -> np.ndarray:
    """One lengths array over several files (a single file's memory map is used as is)."""
    parts = list(parts)
    return parts[0] if len(parts) == 1 else np.concatenate([np.asarray(p) for p in parts]).astype(np.int32)


def _log(msg: str) -> None:
    print(f"nemojax: {msg}", file=sys.stderr, flush=True)
