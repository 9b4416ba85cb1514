"""The import layering a newcomer can rely on (docs/ARCHITECTURE.md), checked two ways.

Static: every `import` / `from ... import` in a package's source (including ones inside
functions) names only packages it may depend on. Runtime: importing the model in a fresh
interpreter does not load the parallel, train or command packages, nor does importing the
config load JAX or the model. Plus: no private JAX / grain modules where public ones exist.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "nemojax"

# package (or module) -> nemojax packages it must never import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "config.py": ("nemojax.model", "nemojax.parallel", "nemojax.train", "nemojax.data", "nemojax.commands"),
    "model": ("nemojax.parallel", "nemojax.train", "nemojax.commands", "nemojax.data"),
    "parallel": ("nemojax.train", "nemojax.commands", "nemojax.data"),
    "train": ("nemojax.commands",),
    "data": ("nemojax.train", "nemojax.parallel", "nemojax.commands"),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


@pytest.mark.parametrize("where", list(FORBIDDEN))
def test_static_import_layering(where: str) -> None:
    files = [PKG / where] if where.endswith(".py") else sorted((PKG / where).rglob("*.py"))
    bad = [f"{f.relative_to(PKG.parent)}:{line} imports {mod}" for f in files for line, mod in _imports(f)
           if any(mod == p or mod.startswith(p + ".") for p in FORBIDDEN[where])]
    assert not bad, "layering violations:\n" + "\n".join(bad)


# Private imports with no public equivalent, each with the reason; anything else fails.
PRIVATE_ALLOWED = {
    # a thread-local switch for the persistent compilation cache: public JAX only has the global
    # jax.config.update("jax_enable_compilation_cache", ...), which would race other threads
    ("inference/programs.py", "jax._src"),
    # cuDNN's packed (ragged) flash attention: jax.nn.dot_product_attention calls this function
    # but does not pass its q_offsets/kv_offsets, the only way to give cuDNN packed documents
    ("model/cudnn_attention.py", "jax._src.cudnn"),
}


def test_no_private_jax_or_grain_modules() -> None:
    bad = [f"{f.relative_to(PKG.parent)}:{line} imports {mod}" for f in sorted(PKG.rglob("*.py"))
           for line, mod in _imports(f) if mod.startswith(("jax._src", "grain._src", "flax.nnx.statelib"))
           and (str(f.relative_to(PKG)), mod) not in PRIVATE_ALLOWED]
    assert not bad, "\n".join(bad)


def _loaded_after(stmt: str) -> set[str]:
    code = f"import sys; {stmt}; print(' '.join(sorted(m for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    return set(out.stdout.split())


def test_runtime_import_layering() -> None:
    mods = _loaded_after("import nemojax.model")
    assert not {m for m in mods if m.startswith(("nemojax.parallel", "nemojax.train", "nemojax.commands"))}
    mods = _loaded_after("import nemojax.config")
    assert "jax" not in mods and not {m for m in mods if m.startswith("nemojax.model")}
