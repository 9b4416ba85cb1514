"""Crash-safe JSONL files for the SDG runner.

Two kinds of file, chosen so a SIGKILL at any instant loses nothing already finished and
duplicates nothing:
- a *ledger* (`.work/<stage>.ledger.jsonl`): one line per processed input item, holding every
  record the item produced and why others were dropped. Each line is written with a single
  `os.write` and `fsync`ed before the next item is recorded. A kill mid-write leaves at most a
  torn last line, which `Ledger.load` cuts off (that item is simply processed again). An item's
  id appears on at most one complete line, so a rerun never duplicates its outputs.
- stage *outputs* (`<stage>.jsonl`, exported datasets): written whole to a temporary file,
  fsynced and renamed into place, so they are either absent or complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable


class StoreError(ValueError):
    """A run-directory file a user must fix or remove; the message names it."""


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All JSON objects of a JSONL file; a bad line raises StoreError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"file not found: {path}")
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise StoreError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise StoreError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
            out.append(rec)
    return out


def write_jsonl_atomic(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Write records to `path` via a fsynced temporary file and a rename; returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return n


def write_json_atomic(path: str | Path, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Ledger:
    """Append-only, fsynced record of processed items (see the module docstring).

    The first line is a header holding the stage's fingerprint (fingerprint.py: everything its
    records depend on); a rerun with a different fingerprint for the same stage is refused
    instead of mixing two configurations (the runner checks `recorded_fingerprint` first, to
    name the keys that changed).
    """

    def __init__(self, path: str | Path, fingerprint: Any) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self._fd: int | None = None

    def recorded_fingerprint(self) -> Any:
        """The fingerprint in the header line, or None when there is no complete header yet."""
        try:
            with self.path.open("rb") as f:
                first = f.readline()
        except FileNotFoundError:
            return None
        if not first.endswith(b"\n"):
            return None
        try:
            header = json.loads(first).get("header")
        except (json.JSONDecodeError, AttributeError):
            raise StoreError(f"{self.path}:1: corrupt ledger header; delete the file to redo this stage") from None
        return header.get("fingerprint") if isinstance(header, dict) else None

    def load(self) -> dict[str, dict[str, Any]]:
        """Entries by item id; cuts a torn last line off the file first."""
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            with self.path.open("r+b") as f:
                f.truncate(cut)
                f.flush()
                os.fsync(f.fileno())
            data = data[:cut]
        entries: dict[str, dict[str, Any]] = {}
        lines = data.decode("utf-8").splitlines()
        for n, line in enumerate(lines, start=1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise StoreError(f"{self.path}:{n}: corrupt ledger line; delete the file to redo this stage") from None
            if "header" in rec:
                if rec["header"].get("fingerprint") != self.fingerprint:
                    raise StoreError(
                        f"{self.path}: this stage was started with a different configuration; use a new "
                        f"run_dir, or delete {self.path} (and the stage's output) to redo it")
                continue
            entries[rec["in"]] = rec
        return entries

    def append(self, entry: dict[str, Any]) -> None:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fresh = not self.path.exists() or self.path.stat().st_size == 0
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            if fresh:
                self._write({"header": {"fingerprint": self.fingerprint}})
        self._write(entry)

    def _write(self, obj: dict[str, Any]) -> None:
        data = (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
        written = os.write(self._fd, data)  # one O_APPEND write: a kill leaves it whole or torn
        while written < len(data):
            written += os.write(self._fd, data[written:])
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
