"""`nemojax compile`: AOT-compile the train step for a TPU topology from this CPU host.

The TPU cases need libtpu (`pip install 'nemojax[tpu]'`) and skip with that reason without it;
they compile a tiny model, so they check the plumbing and the JSON contract, not big numbers
(docs/SCALING.md records those).
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from nemojax.cli import main
from nemojax.config import ConfigError
from nemojax.parallel.aot import libtpu_topology_name

HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAVE_LIBTPU, reason="libtpu not installed: pip install 'nemojax[tpu]'")

TINY = ["model.vocab_size=256", "model.hidden_size=64", "model.num_layers=4", "model.num_heads=4",
        "model.num_kv_heads=2", "model.head_dim=16", "model.ffn_hidden_size=128", "model.max_seq_len=64",
        "data.seq_len=64", "data.global_batch_size=8"]
MEMORY_FIELDS = ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "generated_code_bytes",
                 "total_bytes")


def _compile(capsys, *argv: str) -> dict:
    rc = main(["compile", "tiny", *argv])
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out)


def _check_memory(result: dict) -> None:
    mem = result["memory_per_device"]
    for f in MEMORY_FIELDS:
        assert isinstance(mem[f], int) and mem[f] >= 0, f
    assert mem["argument_bytes"] > 0 and mem["temp_bytes"] > 0
    assert mem["total_bytes"] == (mem["argument_bytes"] + mem["output_bytes"] - mem["alias_bytes"]
                                  + mem["temp_bytes"] + mem["generated_code_bytes"])
    assert result["seconds"]["compile"] > 0


def test_topology_names() -> None:
    assert libtpu_topology_name("v5p-8") == ("v5p:2x2x1", "v5p")  # 8 TensorCores = 4 chips
    assert libtpu_topology_name("v5p-1024") == ("v5p:8x8x8", "v5p")
    assert libtpu_topology_name("v5p-32") == ("v5p:2x2x4", "v5p")
    assert libtpu_topology_name("v5p:4x4x8") == ("v5p:4x4x8", "v5p")
    assert libtpu_topology_name("v5litepod-16") == ("v5e:4x4", "v5e")  # v5e counts chips
    assert libtpu_topology_name("v6e-8") == ("v6e:2x4", "v6e")
    for bad, match in (("v5p-12", "power of two"), ("v9z-8", "unknown TPU type"), ("v5p", "cannot parse"),
                       ("v5p-7", "multiple of 2")):
        with pytest.raises(ConfigError, match=match):
            libtpu_topology_name(bad)


@needs_libtpu
def test_compile_tensor_data_for_v5p(capsys) -> None:
    """4 v5p chips (v5p-8): tensor 2 x data 2, parameters and Adam state sharded."""
    r = _compile(capsys, "--topology", "v5p-8", *TINY, "mesh.tensor=2", "mesh.data=-1")
    assert r["target"]["platform"] == "tpu" and r["target"]["topology"] == "v5p:2x2x1"
    assert r["target"]["devices"] == 4 and r["target"]["hbm_gib"] == 95.0
    assert r["mesh"] == {"data": 2, "pipeline": 1, "fsdp": 1, "tensor": 2}
    _check_memory(r)
    assert r["fits"] is True and 0 < r["headroom_gib"] < 95.0
    # the donated train state aliases its outputs (in-place update on device)
    assert r["memory_per_device"]["alias_bytes"] > 0


@needs_libtpu
def test_compile_interleaved_pipeline_for_v5p(capsys) -> None:
    """8 v5p chips: pipeline 2 (2 virtual stages) x tensor 2 x data 2, bf16, full remat."""
    r = _compile(capsys, "--topology", "v5p:2x2x2", *TINY, "mesh.tensor=2", "mesh.pipeline=2",
                 "mesh.data=-1", "model.compute_dtype=bfloat16", "model.remat_policy=full",
                 "--microbatches", "2", "--virtual-stages", "2")
    assert r["target"]["devices"] == 8
    assert r["mesh"]["pipeline"] == 2
    pipe = r["pipeline"]
    assert (pipe["stages"], pipe["virtual_stages"], pipe["microbatches_per_flush"]) == (2, 2, 2)
    assert pipe["bubble_fraction"] == pytest.approx(1 / 5)  # (P-1) / (N*V + P-1)
    _check_memory(r)
    # the activation and cotangent of every 1F1B tick cross the pipeline axis
    rows = r["collectives_per_step"]["collectives"]
    assert any(row["kind"] == "collective-permute" and row["axes"] == "pipeline" and row["per_step"] >= pipe["ticks"]
               for row in rows), rows


def test_compile_for_cpu_is_labelled(capsys) -> None:
    r = _compile(capsys, "--topology", "cpu", *TINY, "mesh.data=-1", "sharding.zero2=true")
    assert r["target"]["platform"] == "cpu" and "NOT a TPU" in r["target"]["note"]
    assert "fits" not in r
    _check_memory(r)
    # collective bytes per step: ZeRO-2 over data 8 reduce-scatters the fp32 gradient once (the
    # 4-layer tiny model's parameters, 1/8 each) and all-gathers the new weights once
    col = r["collectives_per_step"]
    scatter = [row for row in col["collectives"] if row["kind"] == "reduce-scatter" and row["axes"] == "data"]
    assert scatter and all(row["dtype"] == "f32" and row["per_step"] == row["ops"] for row in scatter)
    assert col["bytes_per_step"] >= sum(row["bytes_per_step"] for row in scatter) > 0


def test_bad_topology_is_a_config_error(capsys) -> None:
    assert main(["compile", "tiny", "--topology", "v5p-12", *TINY]) == 2
    assert "power of two" in capsys.readouterr().err


@needs_libtpu
def test_layout_that_does_not_fit_reports_oom(capsys) -> None:
    """The TPU compiler refuses programs over HBM; that refusal is reported, exit status 1."""
    rc = main(["compile", "tiny", "--topology", "v5e-4", "model.vocab_size=65536", "model.max_seq_len=4096",
               "data.seq_len=4096", "data.global_batch_size=64"])
    r = json.loads(capsys.readouterr().out)
    assert rc == 1 and r["fits"] is False
    err = r["compile_error"]
    assert "RESOURCE_EXHAUSTED" in err["message"]
    assert err["temporaries_required_gib"] > err["hbm_available_gib"] > 15
    # the train state's per-device bytes are known without a successful compile
    assert r["state_bytes_per_device"]["params"] > 0 and r["state_bytes_per_device"]["opt_state"] > 0


def test_no_libtpu_errors_on_a_host_without_tpus(tmp_path) -> None:
    """With libtpu installed and no TPU here, commands print no libtpu initialisation errors: plain
    commands do not start the TPU backend (nemojax.platform), `compile` names the local host so
    libtpu does not query a metadata service."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_PLATFORMS", "TPU_", "XLA_FLAGS"))}
    info = subprocess.run([sys.executable, "-m", "nemojax.cli", "info", "tiny"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert info.returncode == 0 and json.loads(info.stdout)["jax_backend"] == "cpu", info.stderr
    assert info.stderr.strip() == "", info.stderr
    if HAVE_LIBTPU:
        comp = subprocess.run([sys.executable, "-m", "nemojax.cli", "compile", "tiny", "--topology", "v5p-8", *TINY,
                               "model.num_layers=1", "mesh.data=-1"], capture_output=True, text=True, env=env,
                              timeout=300)
        assert comp.returncode == 0, comp.stderr[-3000:]
        noise = [ln for ln in comp.stderr.splitlines() if not ln.startswith("nemojax compile:")]
        assert not noise, "\n".join(noise)


@needs_libtpu
def test_compile_leaves_no_tpu_settings_behind(capsys) -> None:
    """What compile tells libtpu about this host is not left in the environment, where a later
    `nemojax train` subprocess would take this host for a TPU worker of a multi-host job."""
    import os

    before = {k: v for k, v in os.environ.items() if k.startswith("TPU_")}
    _compile(capsys, "--topology", "v5p-8", *TINY, "model.num_layers=1", "mesh.data=-1")
    assert {k: v for k, v in os.environ.items() if k.startswith("TPU_")} == before
