"""Every notebook under colabs/ runs top to bottom on a CPU (shell/magic lines skipped)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "colabs").glob("*.ipynb"))


def notebook_script(path: Path) -> str:
    """The code cells joined into one script; `!cmd` and `%magic` lines are for Colab only."""
    lines: list[str] = []
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code":
            lines += [ln for ln in "".join(cell["source"]).splitlines() if not ln.lstrip().startswith(("!", "%"))]
            lines.append("")
    return "\n".join(lines)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    script = tmp_path / "nb.py"
    script.write_text(notebook_script(path))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_there_is_a_notebook():
    assert NOTEBOOKS
