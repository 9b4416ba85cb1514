"""Every notebook under colabs/ runs top to bottom on a CPU (shell/magic lines skipped).

Running them is the `colab` marker's set (`python -m pytest -m colab`, about 3 CPU-minutes of
training): .ci/run runs it after the default suite, which checks the saved notebooks only.

Conventions every notebook follows, so that CI can run it as a script in a fresh process:

* Small settings: the child runs with `NEMOJAX_COLAB_QUICK=1`; a notebook reads it
  (`QUICK = os.environ.get("NEMOJAX_COLAB_QUICK") == "1"`) to shrink whatever would make it slow
  (fewer steps, layouts, seeds, smaller data), while a user on Colab gets the full run. Every
  assertion must still hold with the small settings.
* Devices: the child starts like a fresh Colab runtime, with `XLA_FLAGS` empty (the 8 fake
  devices of tests/conftest.py are not inherited). A notebook that wants fake devices sets
  `os.environ["XLA_FLAGS"]` itself in its first code cell, before `import jax`
  (colabs/sharding.ipynb does), so its own setting wins here and on Colab alike.
* Plots: matplotlib runs with the non-interactive Agg backend; `plt.show()` is a no-op.
* Compilation: the child shares the test suite's persistent compilation cache.
* `!cmd` and `%magic` lines are Colab-only (installation) and are skipped.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "colabs").glob("*.ipynb"))
# Notebooks not (yet) saved with their full run: name -> why, with the time measured so far. Every
# other notebook must be saved with its full run (test_notebook_is_saved_with_its_full_run).
NOT_YET_SAVED: dict[str, str] = {}
SAVED = [p for p in NOTEBOOKS if p.name not in NOT_YET_SAVED]


def notebook_script(path: Path) -> str:
    """The code cells joined into one script; `!cmd` and `%magic` lines are for Colab only."""
    lines: list[str] = []
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code":
            lines += [ln for ln in "".join(cell["source"]).splitlines() if not ln.lstrip().startswith(("!", "%"))]
            lines.append("")
    return "\n".join(lines)


@pytest.mark.colab
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    script = tmp_path / "nb.py"
    script.write_text(notebook_script(path))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "NEMOJAX_COLAB_QUICK": "1", "MPLBACKEND": "Agg"}
    cache = jax.config.jax_compilation_cache_dir  # set by tests/conftest.py
    if cache:
        env |= {"JAX_COMPILATION_CACHE_DIR": cache,
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": str(jax.config.jax_persistent_cache_min_compile_time_secs)}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_there_is_a_notebook():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_anywhere(path):
    """The first code cell installs nemojax on a fresh runtime, and nothing forces JAX onto the CPU
    (a GPU or TPU runtime uses its accelerator; only the sharding notebook falls back to fake CPU
    devices, and not on a TPU)."""
    code = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    source = "\n".join("".join(c["source"]) for c in code)
    assert 'importlib.util.find_spec("nemojax") is None' in "".join(code[0]["source"])
    assert "JAX_PLATFORMS" not in source


@pytest.mark.parametrize("path", SAVED, ids=[p.name for p in SAVED])
def test_notebook_is_saved_with_its_full_run(path):
    """A reader sees the full run's tables and plots without running anything
    (scripts/execute_notebooks.py), and the saved file stays small."""
    nb = json.loads(path.read_text())
    assert nb["metadata"].get("nemojax_execution", {}).get("settings") == "full", \
        f"{path.name}: run it with `python scripts/execute_notebooks.py {path.relative_to(path.parent.parent)}`"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert not any(o.get("output_type") == "error" for c in code for o in c["outputs"])
    images = [o for c in code for o in c["outputs"] if "image/png" in o.get("data", {})]
    assert images, f"{path.name}: no plot saved"
    assert path.stat().st_size < 1_500_000, f"{path.name}: {path.stat().st_size} bytes; keep outputs small"


def test_not_yet_saved_is_current():
    """NOT_YET_SAVED names real notebooks that are in fact saved without a full run: one saved since
    must leave the list (and so come under the test above)."""
    names = {p.name for p in NOTEBOOKS}
    for name in NOT_YET_SAVED:
        assert name in names, f"NOT_YET_SAVED names {name}, which is not a notebook under colabs/"
        nb = json.loads((NOTEBOOKS[0].parent / name).read_text())
        assert nb["metadata"].get("nemojax_execution", {}).get("settings") != "full", \
            f"{name} is saved with its full run: remove it from NOT_YET_SAVED in {Path(__file__).name}"
