"""Two real processes on localhost form one 8-device mesh and train like one process.

Each child runs this file as a script with 4 fake CPU devices, joins the job through
`nemojax.parallel.distributed.initialize` (NEMOJAX_* environment variables), builds the
hybrid data 2 (DCN: one per process) x fsdp 2 x tensor 2 mesh across both processes, feeds only its own rows of a fixed
batch, and prints its losses. The parent compares them with the same training run in this
single process on 8 fake devices. Every wait is bounded; children are killed on failure.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = 3
# data spans the two processes as DCN (hybrid mesh, a process per "node"); otherwise the same
# layout as an equivalence case, so the in-process reference reuses its compiled step.
MESH = dict(data=2, dcn_data=2, fsdp=2, tensor=2)
SHARDING = dict(zero1=True, sequence_parallel=True)
TIMEOUT_S = 420


def _cfg():
    sys.path.insert(0, str(ROOT / "tests"))
    from test_parallel_equivalence import make_cfg  # same tiny model / optimizer

    return make_cfg(MESH, SHARDING)


def _batch():
    from test_parallel_equivalence import make_batch

    return make_batch()


def train(log_rows: bool = False) -> list[float]:
    """Build the mesh over all (global) devices, train STEPS steps, return the losses."""
    import jax

    from nemojax.parallel.mesh import make_mesh
    from nemojax.train.build import build_training

    cfg = _cfg()
    st = build_training(cfg, make_mesh(cfg.mesh))
    full = _batch()
    micro = full["input_ids"].shape[1]
    rows = st.rows(1, micro)
    if log_rows:
        print(f"process {jax.process_index()} feeds rows {rows.min()}:{rows.max() + 1}", file=sys.stderr)
    batch = st.global_batch({k: v[0][rows] for k, v in full.items()}, 1, micro)
    state = st.init_state(cfg.seed)
    losses = []
    for _ in range(STEPS):
        state, metrics = st.step(state, batch)
        losses.append(float(jax.device_get(metrics["loss"])))
    return losses


def _worker() -> None:
    from nemojax.parallel.distributed import initialize

    info = initialize(timeout_s=120)
    import jax

    assert info.initialized and info.num_processes == 2, info
    assert jax.device_count() == 8 and jax.local_device_count() == 4, jax.devices()
    cache = os.environ.get("NEMOJAX_TEST_CACHE")
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
    losses = train(log_rows=True)
    print("LOSSES " + json.dumps(losses), flush=True)
    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_single_process() -> None:
    port = _free_port()
    procs = []
    try:
        for pid in range(2):
            env = dict(os.environ)
            env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
                       NEMOJAX_COORDINATOR=f"127.0.0.1:{port}", NEMOJAX_NUM_PROCESSES="2",
                       NEMOJAX_PROCESS_ID=str(pid), PYTHONPATH=str(ROOT),
                       NEMOJAX_TEST_CACHE=str(ROOT / ".jax_cache"))
            procs.append(subprocess.Popen([sys.executable, __file__, "--worker"], env=env, cwd=ROOT,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        deadline = time.monotonic() + TIMEOUT_S
        outs = []
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            assert p.returncode == 0, f"worker failed (rc={p.returncode}):\n{err[-4000:]}"
            outs.append((out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    results = []
    for out, err in outs:
        line = [x for x in out.splitlines() if x.startswith("LOSSES ")]
        assert line, f"no losses printed:\n{out}\n{err[-2000:]}"
        results.append(json.loads(line[-1][len("LOSSES "):]))
    # both processes see the same global loss, and the rows they fed were disjoint halves
    assert results[0] == results[1]
    fed = sorted(x for _, err in outs for x in err.splitlines() if "feeds rows" in x)
    assert [f.split()[-1] for f in fed] == ["0:4", "4:8"], fed
    reference = train()  # this process: 8 fake devices, one process
    assert len(reference) == STEPS and reference[-1] < reference[0]
    for a, b in zip(results[0], reference):
        assert abs(a - b) <= 1e-5, (results[0], reference)


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
