"""`nemojax align` killed mid-stage (SIGKILL) and rerun resumes at the stage where it stopped.

Slow (minutes: several `nemojax train` subprocesses). A tiny world and one iteration: the base,
the SDG step, then general SFT long enough to save checkpoints; the run is killed once general
SFT has logged training steps, and the rerun must skip every finished step, resume general SFT
from its checkpoint (not from step 0) and write the summary.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
CORPUS = "\"data.sources=[{path: '{world}/pretrain/corpus.jsonl', weight: 1.0}]\""
OVERRIDES = [
    "world.spec={seed: 0, families: [strings, lists], train_levels: [1], eval_levels: [1], pretrain_documents: 200, "
    "seed_conversations: 64, eval_per_family: 4, prompts_per_pool: 32, pools: 1, reward_records: 8}",
    f"bases.weak.overrides=[model.num_layers=2, steps=10, checkpoint_every=10, {CORPUS}]",
    "generator.stages=[]", "iterations=[{base: weak}]", "pipeline=[general_sft]",
    "stages.general_sft.overrides=[\"stage.train={sdg}/sft.jsonl\", stage.epochs=12, checkpoint_every=5, "
    "log_every=1, keep_checkpoints=2]",
    "eval.max_tokens=8",
]


def align(run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return subprocess.Popen([sys.executable, "-m", "nemojax.cli", "align", "configs/align/toy.yaml",
                             f"run_dir={run_dir}", *OVERRIDES], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_killed_mid_stage_resumes_where_it_stopped(tmp_path) -> None:
    run_dir = tmp_path / "align"
    sft_dir = run_dir / "iter_1" / "general_sft"
    proc = align(run_dir)
    deadline = time.monotonic() + 900
    try:
        # wait until general SFT has saved a checkpoint past its first one, then kill the whole group
        while time.monotonic() < deadline and proc.poll() is None:
            saved = [int(p.name) for p in (sft_dir / "checkpoints").glob("*") if p.name.isdigit()]
            if saved and max(saved) >= 10:
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.stdout.read()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not (sft_dir / "step.json").exists() and not (run_dir / "summary.json").exists()
    killed_at = max(int(p.name) for p in (sft_dir / "checkpoints").glob("*") if p.name.isdigit())

    rerun = align(run_dir)
    out, _ = rerun.communicate(timeout=900)
    assert rerun.returncode == 0, out[-3000:]
    assert "base weak: done before" in out and "iteration 1 SDG: done before" in out, out[-3000:]
    assert "iteration 1 general_sft: training" in out  # the interrupted step runs again ...
    resumed = re.findall(r"resumed from \S+/checkpoints/(\d+)", (sft_dir / "log.txt").read_text())
    assert resumed and int(resumed[-1]) >= 5  # ... from its checkpoint, not from step 0
    summary = json.loads((run_dir / "summary.json").read_text())
    (stage,) = summary["iterations"][0]["stages"]
    assert stage["step"] == "iteration 1 general_sft" and 0.0 <= stage["eval"]["score"] <= 1.0
    last = json.loads((sft_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] > killed_at
