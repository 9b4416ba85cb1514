"""Random-access document sources: JSONL, Parquet, ArrayRecord (pre-tokenized), built-in.

Every source is a sequence of documents addressable by index, so grain can shard, shuffle
and repeat it by index arithmetic alone, and a pipeline resumes by jumping straight to a
document number instead of replaying the stream. Text sources return `str`; tokenized
sources (ArrayRecord, the cached built-in corpus) return int32 numpy arrays.

Schemas:
- JSONL: one JSON object per line; the document is the string under `text_field`
  (default "text"). Blank lines are skipped. Hugging Face `datasets` `.to_json()` exports load.
- Parquet: a string column named `text_field`. The column is loaded into memory (as Arrow
  buffers) on first use, which is right for the sizes a CPU host trains on.
- ArrayRecord: one record per document holding the token ids as little-endian int32
  bytes (`np.asarray(ids, "<i4").tobytes()`); `write_array_record` writes such files, and
  keeps their length index beside them (nemojax.data.length_index).

Length index files (`*.lenidx`) are never data: directory and glob listings skip them.
"""

from __future__ import annotations

import glob as globlib
import json
import mmap
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


class DataError(ValueError):
    """Bad data or a bad data path; the message names the file (and line) to fix."""


TOKEN_DTYPE = np.dtype("<i4")
INDEX_SUFFIX = ".lenidx"  # length index files (nemojax.data.length_index)


def expand_paths(pattern: str, what: str = "data path") -> list[Path]:
    """A file, a directory (all files in it) or a glob, as a sorted non-empty file list."""
    p = Path(pattern).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(q for q in p.iterdir() if q.is_file() and not q.name.startswith("."))
    else:
        files = sorted(Path(q) for q in globlib.glob(str(p), recursive=True) if Path(q).is_file())
    files = [q for q in files if not q.name.endswith(INDEX_SUFFIX)]
    if not files:
        raise DataError(f"{what}: no file found at {pattern!r}" +
                        ("" if p.parent.exists() else f" (directory {p.parent} does not exist)"))
    return files


def infer_format(path: str) -> str:
    """jsonl | parquet | arrayrecord | builtin, from a `builtin:` prefix or a file suffix."""
    if path.startswith("builtin:"):
        return "builtin"
    name = path.lower().rstrip("*/")
    for suffixes, fmt in (((".jsonl", ".json", ".ndjson"), "jsonl"), ((".parquet", ".pq"), "parquet"),
                          ((".arrayrecord", ".array_record", ".ar"), "arrayrecord")):
        if name.endswith(suffixes) or any(s + "-" in name for s in suffixes):
            return fmt
    raise DataError(f"cannot tell the format of {path!r} from its name; set format: jsonl, parquet, "
                    f"arrayrecord or builtin in its data source config")


def _newline_offsets(buf: Any, size: int, chunk: int = 1 << 26) -> np.ndarray:
    """Byte offsets of every newline, scanned in 64 MiB chunks to bound memory on big files."""
    view = np.frombuffer(buf, np.uint8)
    parts = [np.flatnonzero(view[s:s + chunk] == ord("\n")) + s for s in range(0, size, chunk)]
    del view  # release the buffer export so the mmap could be closed
    return np.concatenate(parts).astype(np.int64)


class JsonlFile:
    """One JSONL file, indexed by the byte ranges of its non-blank lines.

    The ranges come from a length index (`spans`, nemojax.data.length_index) or, without one,
    from a vectorised newline scan of the whole file.
    """

    def __init__(self, path: Path, text_field: str, spans: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.path = path
        self.text_field = text_field
        size = path.stat().st_size
        self._buf: bytes | mmap.mmap = b""
        if size:
            with path.open("rb") as f:
                self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if spans is not None:
            self._starts, self._ends = spans
            if len(self._ends) and int(self._ends[-1]) > size:
                raise DataError(f"{path}: its length index lists lines past the end of the file; the file "
                                f"changed after the index was written")
            return
        if size == 0:
            starts = ends = np.zeros(0, np.int64)
        else:
            nl = _newline_offsets(self._buf, size)
            starts = np.concatenate([[0], nl + 1])
            ends = np.concatenate([nl, [size]])
        nonblank = ends - starts > 0
        # Lines holding only whitespace are blank too; rare, so check them one by one.
        for i in np.flatnonzero(nonblank & (ends - starts < 8)):
            if not bytes(self._buf[starts[i]:ends[i]]).strip():
                nonblank[i] = False
        lines = np.flatnonzero(nonblank)  # 0-based line numbers of documents
        self._starts, self._ends = starts[lines], ends[lines]

    def __len__(self) -> int:
        return len(self._starts)

    def spans(self) -> tuple[np.ndarray, np.ndarray]:
        """(starts, ends): the byte range of every document's line."""
        return np.asarray(self._starts, np.int64), np.asarray(self._ends, np.int64)

    def line_number(self, i: int) -> int:
        """1-based line number of document i (counted on demand: only error messages need it)."""
        start = int(self._starts[i])
        return 1 + sum(int(np.count_nonzero(np.frombuffer(self._buf, np.uint8, min(1 << 26, start - s), s)
                                            == ord("\n"))) for s in range(0, start, 1 << 26))

    def __getitem__(self, i: int) -> str:
        raw = self._buf[int(self._starts[i]):int(self._ends[i])]
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{self.path}:{self.line_number(i)}: not valid JSON ({e})") from None
        if not isinstance(obj, dict) or self.text_field not in obj:
            fields = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
            raise DataError(f"{self.path}:{self.line_number(i)}: no {self.text_field!r} field (found: {fields}); "
                            f"set text_field in this data source's config")
        text = obj[self.text_field]
        if not isinstance(text, str):
            raise DataError(f"{self.path}:{self.line_number(i)}: field {self.text_field!r} must be a string, "
                            f"got {type(text).__name__}")
        return text


class ParquetFile:
    """The text column of one Parquet file, read on first access."""

    def __init__(self, path: Path, text_field: str) -> None:
        import pyarrow.parquet as pq

        self.path = path
        self.text_field = text_field
        try:
            self._file = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        names = self._file.schema_arrow.names
        if text_field not in names:
            raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}); "
                            f"set text_field in this data source's config")
        self._len = self._file.metadata.num_rows
        self._column: Any = None

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> str:
        if self._column is None:
            self._column = self._file.read(columns=[self.text_field]).column(0).combine_chunks()
        text = self._column[i].as_py()
        if not isinstance(text, str):
            raise DataError(f"{self.path}: row {i} of column {self.text_field!r} is {text!r}, not a string")
        return text


class ArrayRecordFile:
    """Pre-tokenized documents: one ArrayRecord record of int32 ids per document."""

    def __init__(self, path: Path) -> None:
        from array_record.python import array_record_module

        self.path = path
        try:
            self._reader = array_record_module.ArrayRecordReader(str(path), "readahead_buffer_size:0")
        except Exception as e:
            raise DataError(f"{path}: not a readable ArrayRecord file ({e})") from None
        self._len = int(self._reader.num_records())

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> np.ndarray:
        rec = self._reader.read([int(i)])[0]
        if len(rec) % 4:
            raise DataError(f"{self.path}: record {i} has {len(rec)} bytes, not a multiple of 4; records must "
                            f"be int32 token ids (write them with nemojax.data.sources.write_array_record)")
        return np.frombuffer(rec, TOKEN_DTYPE)

    def read_many(self, idx: Iterable[int]) -> list[np.ndarray]:
        """Several records in one call (the reader fetches them in parallel)."""
        idx = [int(i) for i in idx]
        recs = self._reader.read(idx) if idx else []
        for i, rec in zip(idx, recs):
            if len(rec) % 4:
                raise DataError(f"{self.path}: record {i} has {len(rec)} bytes, not a multiple of 4; records "
                                f"must be int32 token ids (write them with nemojax.data.sources.write_array_record)")
        return [np.frombuffer(r, TOKEN_DTYPE) for r in recs]


def write_array_record(path: str | Path, documents: Iterable[Sequence[int] | np.ndarray]) -> int:
    """Write pre-tokenized documents (sequences of token ids) to an ArrayRecord file.

    Returns the number of records written. Ids are stored as little-endian int32, one
    record per document, in the order given (group_size:1 keeps random access cheap). The
    file's length index (`PATH.lenidx`) is written beside it, so pipelines plan rows from it
    without reading the records.
    """
    from array_record.python import array_record_module

    from nemojax.data.length_index import index_token_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
    lengths: list[int] = []
    try:
        for doc in documents:
            arr = np.asarray(doc)
            if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
                raise DataError(f"write_array_record({path}): document {len(lengths)} must be a 1-D sequence "
                                f"of ints")
            writer.write(arr.astype(TOKEN_DTYPE).tobytes())
            lengths.append(arr.size)
    finally:
        writer.close()
    index_token_file(path, lengths)
    return len(lengths)


class ConcatSource:
    """Several files of one format read as one indexable sequence of documents."""

    def __init__(self, files: Sequence[Any]) -> None:
        self.files = list(files)
        self._cum = np.cumsum([0] + [len(f) for f in self.files])

    def __len__(self) -> int:
        return int(self._cum[-1])

    def locate(self, i: int) -> tuple[int, int]:
        f = int(np.searchsorted(self._cum, i, side="right")) - 1
        return f, int(i - self._cum[f])

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < len(self):
            raise IndexError(i)
        f, j = self.locate(i)
        return self.files[f][j]

    def read_many(self, idx: Sequence[int]) -> list[Any]:
        """Documents `idx` in that order, fetched per file in one call where the file can."""
        out: list[Any] = [None] * len(idx)
        by_file: dict[int, list[tuple[int, int]]] = {}
        for pos, i in enumerate(idx):
            if not 0 <= i < len(self):
                raise IndexError(i)
            f, j = self.locate(int(i))
            by_file.setdefault(f, []).append((pos, j))
        for f, wanted in by_file.items():
            src = self.files[f]
            docs = src.read_many([j for _, j in wanted]) if hasattr(src, "read_many") else [src[j] for _, j in wanted]
            for (pos, _), d in zip(wanted, docs):
                out[pos] = d
        return out


class TokenArraySource:
    """Documents stored as one flat token array plus offsets (the built-in corpus cache)."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray) -> None:
        self.tokens = tokens
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        """Token count of every document (from the offsets, without reading any token)."""
        return np.diff(self.offsets)


def iter_texts(path: str, fmt: str | None = None, text_field: str = "text") -> Iterable[str]:
    """All documents of a text file set in order (plain .txt files count as one document each)."""
    for f in expand_paths(path):
        kind = fmt or ("text" if f.suffix.lower() in (".txt", ".md", ".py", ".rst") else infer_format(str(f)))
        if kind == "text":
            yield f.read_text(encoding="utf-8", errors="replace")
        elif kind in ("jsonl", "parquet"):
            src = JsonlFile(f, text_field) if kind == "jsonl" else ParquetFile(f, text_field)
            for i in range(len(src)):
                yield src[i]
        else:
            raise DataError(f"{f}: cannot read text from a {kind} file")


def cache_dir() -> Path:
    """Where tokenized corpora are cached: $NEMOJAX_CACHE_DIR or ~/.cache/nemojax."""
    return Path(os.environ.get("NEMOJAX_CACHE_DIR") or Path.home() / ".cache" / "nemojax")
