"""Run colabs/*.ipynb top to bottom in a Jupyter kernel and save them with their outputs, so a reader
sees every table and plot without running anything.

    python scripts/execute_notebooks.py                       # every notebook, full settings
    python scripts/execute_notebooks.py colabs/quickstart.ipynb --quick

Each notebook runs in a fresh kernel with the repository as its working directory (as a Colab user
who cloned it would); `--quick` sets NEMOJAX_COLAB_QUICK=1 (the test suite's small settings). Long
text outputs are cut to their first and last lines so that a saved notebook stays small; images
are kept. A notebook whose cell fails is not saved (the error is printed) and the exit code is 1.
Needs nbclient, nbformat and ipykernel (the `dev` extra). The kernel inherits this process's
environment: on a machine without an accelerator whose JAX has a TPU or GPU plugin installed, run it
with `JAX_PLATFORMS=cpu` so that the plugin's failed probe does not land in the saved outputs (the
metadata records the backend the notebook printed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAD, TAIL = 25, 35  # lines of a long text output kept at its start and its end


def trim(text: str) -> str:
    lines = text.splitlines(keepends=True)
    if len(lines) <= HEAD + TAIL + 1:
        return text
    return "".join(lines[:HEAD]) + f"... ({len(lines) - HEAD - TAIL} lines left out)\n" + "".join(lines[-TAIL:])


def merged_streams(outputs: list) -> list:
    """Consecutive stream outputs of one stream (a kernel sends one per flush) as one, as a notebook
    front end shows them, so that a long log is cut once, not line by line."""
    merged: list = []
    for out in outputs:
        prev = merged[-1] if merged else None
        if (out.get("output_type") == "stream" and prev is not None and prev.get("output_type") == "stream"
                and prev.get("name") == out.get("name")):
            prev["text"] += out["text"]
        else:
            merged.append(out)
    return merged


def small_outputs(nb) -> None:
    """Cut long streams and plain-text results; keep images; drop widget state."""
    for cell in nb.cells:
        if "outputs" in cell:
            cell["outputs"] = merged_streams(cell["outputs"])
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                out["text"] = trim(out["text"])
            elif "data" in out and "text/plain" in out["data"]:
                out["data"]["text/plain"] = trim(out["data"]["text/plain"])
    nb.metadata.pop("widgets", None)


def _backend(nb) -> str:
    """The JAX backend the notebook printed ("JAX <version> on <backend> ..."), else unknown."""
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            text = out.get("text", "") if out.get("output_type") == "stream" else ""
            for line in text.splitlines():  # one stream output holds every line a cell printed
                if line.startswith("JAX ") and " on " in line:
                    return line.split(" on ", 1)[1].split()[0]
    return "unknown"


def execute(path: Path, quick: bool, timeout: int) -> bool:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    env = {k: v for k, v in os.environ.items() if k != "NEMOJAX_COLAB_QUICK"}
    if quick:
        env["NEMOJAX_COLAB_QUICK"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    t0 = time.time()
    saved = os.environ.copy()
    os.environ.clear()
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client.execute()
    except CellExecutionError as e:
        print(f"{path}: a cell failed after {time.time() - t0:.0f} s; not saved\n{str(e)[-3000:]}", file=sys.stderr)
        return False
    finally:
        os.environ.clear()
        os.environ.update(saved)
    small_outputs(nb)
    nb.metadata["nemojax_execution"] = {"settings": "quick" if quick else "full", "seconds": round(time.time() - t0),
                                        "date": time.strftime("%Y-%m-%d"), "backend": _backend(nb)}
    nbformat.write(nb, path)
    print(f"{path}: ran in {time.time() - t0:.0f} s, saved with its outputs ({path.stat().st_size / 1024:.0f} KiB)")
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("notebooks", nargs="*", help="default: colabs/*.ipynb")
    p.add_argument("--quick", action="store_true", help="NEMOJAX_COLAB_QUICK=1: the test suite's small settings")
    p.add_argument("--timeout", type=int, default=7200, help="seconds per cell")
    args = p.parse_args(argv)
    paths = [Path(x) for x in args.notebooks] or sorted((ROOT / "colabs").glob("*.ipynb"))
    ok = [execute(path, args.quick, args.timeout) for path in paths]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
