"""The built-in default corpus: text that ships with every Python install.

nemojax must train out of the box with no network, so its default pretraining data is
built from the CPython standard library that is already on disk. Two distinct sources
play the roles of Nemotron's blend components (English text vs. code):

- ``prose``: English documentation. One document per ``pydoc_data.topics`` entry (the
  language reference pages behind ``help("for")``), one per stdlib module gathering its
  module, class and function docstrings, the idlelib text files (README, NEWS, ...),
  the Python license and the Zen of Python.
- ``code``: the stdlib's own ``.py`` files, one document per file, minus tests, generated
  files and codec tables (which are hex tables rather than code a model should imitate).

Everything is read in sorted path order and nothing depends on the environment beyond the
Python version, so a given interpreter always yields the same documents in the same order.
Different Python versions ship different stdlibs; `corpus_fingerprint` captures that so
caches keyed on it never mix them. With CPython 3.11 the sources hold about 2.4 MB (prose,
625 documents, ~0.74 M tokens with the shipped tokenizer) and 9.9 MB (code, 601 documents,
~3.1 M tokens): plenty for the tiny model, small enough to tokenize in seconds.
"""

from __future__ import annotations

import ast
import codecs
import hashlib
import sys
import sysconfig
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

# Bump when the document extraction changes, so tokenization caches are rebuilt.
CORPUS_VERSION = 1

BUILTIN_SOURCES = ("prose", "code")

# Directories (any path component) that never contribute: tests, build residue, vendored wheels,
# the codec tables in `encodings`, and pydoc_data (its topics are prose, not code).
_SKIP_DIRS = frozenset({
    "test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib-dynload",
    "ensurepip", "encodings", "pydoc_data", "__phello__",
})
_SKIP_PREFIXES = ("config-", "_sysconfigdata")


def stdlib_dir() -> Path:
    """The directory holding the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


@lru_cache(maxsize=1)
def _stdlib_files() -> tuple[Path, ...]:
    """All eligible stdlib `.py` files in sorted relative-path order (deterministic)."""
    root = stdlib_dir()
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if any(part in _SKIP_DIRS for part in rel.parts[:-1]):
            continue
        if rel.parts[0].startswith(_SKIP_PREFIXES) or rel.name.startswith(_SKIP_PREFIXES):
            continue
        out.append(p)
    return tuple(sorted(out, key=lambda q: q.relative_to(root).as_posix()))


def _read(path: Path) -> str:
    # A few stdlib files are not UTF-8 clean; replacement keeps the corpus deterministic.
    return path.read_bytes().decode("utf-8", errors="replace")


def _module_name(path: Path) -> str:
    rel = path.relative_to(stdlib_dir()).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _docstring_document(path: Path) -> str | None:
    """A module's docstrings as one readable document, or None when it has none.

    Parsing (not importing) keeps this side-effect free: importing `antigravity` opens a
    browser, `this` prints, and some modules need platform libraries.
    """
    try:
        tree = ast.parse(_read(path))
    except (SyntaxError, ValueError):
        return None
    name = _module_name(path)
    parts: list[str] = []
    mod_doc = ast.get_docstring(tree)
    if mod_doc:
        parts.append(f"{name}\n\n{mod_doc}")

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if child.name.startswith("_") and not child.name.startswith("__"):
                    continue  # private helpers: terse, implementation-speak docstrings
                qual = f"{prefix}{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    kind = "class" if isinstance(child, ast.ClassDef) else "def"
                    parts.append(f"{kind} {qual}\n\n{doc}")
                if isinstance(child, ast.ClassDef):
                    visit(child, qual + ".")

    visit(tree, f"{name}.")
    return "\n\n".join(parts) if parts else None


def _zen() -> str:
    """The Zen of Python, decoded from `this.py` without importing it (import prints)."""
    tree = ast.parse(_read(stdlib_dir() / "this.py"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "s" for t in node.targets):
            return "The Zen of Python, by Tim Peters\n\n" + codecs.decode(ast.literal_eval(node.value), "rot13")
    return ""


def _pydoc_topics() -> Iterator[str]:
    path = stdlib_dir() / "pydoc_data" / "topics.py"
    if not path.exists():
        return
    tree = ast.parse(_read(path))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            topics = ast.literal_eval(node.value)
            for key in sorted(topics):
                text = topics[key].strip()
                if text:
                    yield text


def _prose_documents() -> Iterator[str]:
    yield from _pydoc_topics()
    for path in _stdlib_files():
        doc = _docstring_document(path)
        if doc:
            yield doc
    root = stdlib_dir()
    for path in sorted((root / "idlelib").glob("*.txt")):
        yield _read(path).strip()
    if (root / "LICENSE.txt").exists():
        yield _read(root / "LICENSE.txt").strip()
    zen = _zen()
    if zen:
        yield zen


def _code_documents() -> Iterator[str]:
    for path in _stdlib_files():
        text = _read(path)
        if text.strip():
            yield text


def builtin_documents(name: str) -> Iterator[str]:
    """Yield the documents of built-in source `name` ("prose" or "code") in a fixed order."""
    if name == "prose":
        return _prose_documents()
    if name == "code":
        return _code_documents()
    raise ValueError(f"unknown builtin corpus source {name!r}; choose one of {', '.join(BUILTIN_SOURCES)} "
                     f"(in a data config: path: builtin:prose)")


@lru_cache(maxsize=None)
def corpus_fingerprint(name: str) -> str:
    """A short hash identifying the documents `builtin_documents(name)` yields here.

    Built from the Python version, the corpus version and the stdlib file list with sizes,
    so it is cheap (no reading of contents) yet changes whenever the documents could.
    """
    if name not in BUILTIN_SOURCES:
        builtin_documents(name)  # raises the helpful error
    h = hashlib.sha256(f"{name}:{CORPUS_VERSION}:{sys.version}:{stdlib_dir()}".encode())
    root = stdlib_dir()
    for p in _stdlib_files():
        h.update(f"{p.relative_to(root).as_posix()}:{p.stat().st_size}\n".encode())
    return h.hexdigest()[:16]
