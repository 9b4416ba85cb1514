"""Data-parallel gradient reduction in the compiled step: fp32, once per optimizer step (Megatron).

Read from the HLO right after SPMD partitioning (`collectives.spmd_partitioned_hlo`: the CPU
backend later promotes bf16 all-reduces to f32, which would hide the partitioner's dtype) of the
whole train step that `nemojax train` runs: a tiny model in the 15B/340B presets' precision (bf16
weights and compute, fp32 master, ZeRO-2) on 8 fake devices. The dump needs a real compile each
time (the persistent cache is bypassed), so the model is as small as the point allows. Collectives inside loops are counted
once per iteration, so a reduction inside the accumulation loop shows up as growing with the
number of accumulation slices.

Checked for 1 and 4 accumulation slices (data 2 x fsdp 2 x tensor 2) and, pipelined, for 1 and 2
(data 2 x pipeline 2 x tensor 2, 2 virtual stages, 1F1B):
* every collective over `data` runs the same number of times and moves the same bytes whatever
  the slice count, none of them inside a loop;
* the gradients leave as fp32 reduce-scatters over `data`, one per trained leaf (ZeRO-2), and
  the new weights come back as one bf16 all-gather per leaf; nothing else over `data` but
  scalar all-reduces (loss sums, the gradient norm);
* pipelined: the weight relayout and its reverse for the gradients (collective-permutes over
  `pipeline` outside the tick loop) also run once per step.

Mutants this kills (tried): the accumulation left to the partitioner (per-slice bf16
all-reduces over data+fsdp), the reduction done as an all-reduce instead of the ZeRO-2
reduce-scatter, the accumulator in bf16 (bf16 reduce-scatter), the pipelined gradients
relayout moved inside the tick loop.
"""

from __future__ import annotations

from typing import Any

import pytest

from nemojax.config import config_from_dict
from nemojax.parallel.collectives import analyze, spmd_partitioned_hlo, summarize
from nemojax.parallel.mesh import make_mesh
from nemojax.parallel.pipeline_table import build
from nemojax.train.build import build_training

MODEL = dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
             ffn_hidden_size=128, max_seq_len=32, param_dtype="bfloat16", compute_dtype="bfloat16")
MICRO = 8
TRAINED_LEAVES = 14  # embed, lm_head, 2 final norms, 10 stacked block arrays


def collectives(mesh_cfg: dict[str, int], accum: int, pipeline: dict[str, int] | None = None,
                layers: int = 2) -> dict[str, Any]:
    cfg = config_from_dict({"model": dict(MODEL, num_layers=layers), "mesh": mesh_cfg, "sharding": {"zero1": True, "zero2": True},
                            "pipeline": pipeline or {}, "steps": 2,
                            "data": dict(seq_len=32, global_batch_size=MICRO * accum, micro_batch_size=MICRO)})
    training = build_training(cfg, make_mesh(cfg.mesh))
    hlo = spmd_partitioned_hlo(training.lower(accum, MICRO))
    found = analyze(hlo, training.mesh.axis_names, training.mesh.devices.shape)
    return {"all": found, "summary": summarize(found)}


def over(found: list, axis: str) -> list:
    return [c for c in found if axis in c.axes]


def signature(found: list) -> list[tuple]:
    return sorted((c.kind, c.axes, c.dtypes, c.bytes, c.count) for c in found)


def check_data_parallel(one: dict[str, Any], many: dict[str, Any]) -> None:
    d1, dn = over(one["all"], "data"), over(many["all"], "data")
    assert signature(d1) == signature(dn), "data-parallel collectives change with the accumulation count"
    assert all(c.count == 1 for c in dn), [c for c in dn if c.count != 1]  # none inside a loop
    scatters = [c for c in dn if c.kind == "reduce-scatter"]
    assert len(scatters) == TRAINED_LEAVES and all(c.axes == ("data",) and c.dtypes == ("f32",) for c in scatters)
    gathers = [c for c in dn if c.kind == "all-gather"]
    assert len(gathers) == TRAINED_LEAVES and all(c.axes == ("data",) and c.dtypes == ("bf16",) for c in gathers)
    # the gathered bf16 weights are exactly twice the scattered fp32 shards' bytes over 2 data ranks
    assert sum(c.bytes for c in gathers) == sum(c.bytes for c in scatters)
    others = [c for c in dn if c.kind not in ("reduce-scatter", "all-gather")]
    assert all(c.kind == "all-reduce" and c.bytes <= 16 for c in others), others  # scalars only


@pytest.fixture(scope="module")
def data_fsdp_tensor() -> tuple[dict, dict]:
    mesh = dict(data=2, fsdp=2, tensor=2)
    return collectives(mesh, 1), collectives(mesh, 4)


def test_data_parallel_gradients_reduced_once_in_fp32(data_fsdp_tensor) -> None:
    one, four = data_fsdp_tensor
    check_data_parallel(one, four)
    # FSDP and tensor parallelism stay per layer and per micro-batch (they shard the weights and
    # the heads): those collectives do grow with the slices -- the counting sees loops.
    per_slice = [c for c in four["all"] if "data" not in c.axes and c.count is not None and c.count >= 4]
    assert per_slice, "no per-micro-batch collective found: the loop counting is broken"


@pytest.mark.slow
def test_pipelined_gradients_reduced_and_relaid_once() -> None:
    mesh, pipe = dict(data=2, pipeline=2, tensor=2), dict(virtual_stages=2, microbatches=2)
    one, two = collectives(mesh, 1, pipe, layers=4), collectives(mesh, 2, pipe, layers=4)
    check_data_parallel(one, two)
    relayout = [sorted(c.bytes for c in run["all"] if c.kind == "collective-permute" and c.count == 1)
                for run in (one, two)]
    assert relayout[0] and relayout[0] == relayout[1]
    # inside the tick loop only the activation (forward) and its cotangent (backward) move, once
    # per tick each: [2 rows, 32 tokens, 64] bf16 per device
    for run, accum in ((one, 1), (two, 2)):
        ticks = build(2, 2, accum * 2).ticks
        looped = [c for c in run["all"] if c.kind == "collective-permute" and c.count != 1]
        assert sorted((c.axes, c.bytes, c.count) for c in looped) == [(("pipeline",), 2 * 32 * 64 * 2, ticks)] * 2
