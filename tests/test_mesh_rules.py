"""Mesh construction, logical-axis rules, ZeRO-1 specs, measured shardings, memory, distributed setup."""

from __future__ import annotations

import contextlib
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from nemojax.cli import main as cli_main
from nemojax.config import ConfigError, MeshConfig, ShardingConfig, config_from_dict, load_config
from nemojax.model.transformer import ACT_AXES, abstract_model, logical_axes
from nemojax.parallel.distributed import resolve_settings
from nemojax.parallel.mesh import MESH_AXES, axis_sizes, make_abstract_mesh, make_mesh
from nemojax.parallel.rules import (add_axis_to_largest_dim, check_divisible, constrain,
                                    logical_to_spec, resolve_rules, tree_shardings, use_rules)
from nemojax.train.build import build_training, training_state_bytes
from nemojax.train.optim import with_fp32_master

MODEL = dict(vocab_size=128, hidden_size=64, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=8,
             ffn_hidden_size=256, max_seq_len=32)


SHARDING_KEYS = ("zero1", "zero2", "sequence_parallel", "rules")


def cfg_for(mesh: dict, **model) -> object:
    """A config from a mesh dict that may also hold the `sharding:` keys (zero1, ...)."""
    sharding = {k: v for k, v in mesh.items() if k in SHARDING_KEYS}
    mesh = {k: v for k, v in mesh.items() if k not in SHARDING_KEYS}
    return config_from_dict({"model": {**MODEL, **model}, "mesh": mesh, "sharding": sharding, "steps": 2,
                             "data": dict(seq_len=32, global_batch_size=8)})


# --------------------------------------------------------------------------- mesh


def test_axis_sizes_fill_and_errors() -> None:
    assert axis_sizes(MeshConfig(data=-1, tensor=2), 8) == {"data": 4, "pipeline": 1, "fsdp": 1, "tensor": 2}
    assert axis_sizes(MeshConfig(data=2, fsdp=-1, tensor=2), 8)["fsdp"] == 2
    with pytest.raises(ConfigError, match=r"multiplies to 6 devices but 8 are available"):
        axis_sizes(MeshConfig(data=3, tensor=2), 8)
    with pytest.raises(ConfigError, match=r"fixed axes multiply to 3, which does not divide the 8"):
        axis_sizes(MeshConfig(data=-1, tensor=3), 8)
    with pytest.raises(ConfigError, match=r"at most one axis may be -1"):
        axis_sizes(MeshConfig(data=-1, fsdp=-1), 8)


def test_mesh_order_puts_tensor_innermost() -> None:
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert mesh.axis_names == MESH_AXES and MESH_AXES[-1] == "tensor"
    assert dict(mesh.shape) == {"data": 2, "pipeline": 1, "fsdp": 2, "tensor": 2}
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    # neighbours along tensor are adjacent device ids; data is the outermost stride
    assert np.all(np.diff(ids, axis=3) == 1)
    assert np.all(ids[1] - ids[0] == 4)


def test_hybrid_mesh_keeps_dcn_outermost_within_axis() -> None:
    # two "slices" of 4 devices (one process: consecutive blocks); fsdp spans both slices
    mesh = make_mesh(MeshConfig(data=2, fsdp=4, dcn_fsdp=2))
    ids = np.vectorize(lambda d: d.id)(mesh.devices)[:, 0, :, 0]
    assert ids.tolist() == [[0, 1, 4, 5], [2, 3, 6, 7]]
    with pytest.raises(ConfigError, match=r"dcn_tensor=4 does not divide mesh.tensor=2"):
        MeshConfig(data=4, tensor=2, dcn_tensor=4).validate()


# --------------------------------------------------------------------------- rules


def test_logical_to_spec_never_reuses_a_mesh_axis_and_drops_size_one() -> None:
    rules = resolve_rules(ShardingConfig())
    mesh = make_abstract_mesh(MeshConfig(data=2, fsdp=2, tensor=2), 8)
    assert logical_to_spec(("batch", "length", "embed"), rules, mesh) == P(("data", "fsdp"))
    assert logical_to_spec(("layers", "embed", "mlp"), rules, mesh) == P(None, "fsdp", "tensor")
    assert logical_to_spec(("embed", "embed"), rules, mesh) == P("fsdp")
    assert logical_to_spec(("unknown_axis", "vocab"), rules, mesh) == P(None, "tensor")
    # without a mesh, size-1 axes are kept
    assert logical_to_spec(("layers", "mlp"), rules) == P("pipeline", "tensor")
    only_data = make_abstract_mesh(MeshConfig(data=8), 8)
    assert logical_to_spec(("embed", "mlp"), rules, only_data) == P()


def test_rules_from_config_overrides_and_sequence_parallel() -> None:
    cfg = load_config(None, ["sharding.rules.kv_heads=null", "sharding.rules.embed=[fsdp, data]",
                             "sharding.sequence_parallel=true"])
    rules = resolve_rules(cfg.sharding)
    assert rules["kv_heads"] == () and rules["embed"] == ("fsdp", "data")
    assert rules["length"] == ("tensor",) and rules["heads"] == ("tensor",)
    assert resolve_rules(ShardingConfig())["length"] == ()
    with pytest.raises(ConfigError, match=r"sharding.rules.heads='tensr'"):
        load_config(None, ["sharding.rules.heads=tensr"])
    # the keys that moved out of mesh: say where they went
    with pytest.raises(ConfigError, match=r"'mesh.zero1' has moved: write sharding.zero1=False"):
        load_config(None, ["mesh.zero1=false"])
    with pytest.raises(ConfigError, match=r"'mesh.microbatches' has moved: write pipeline.microbatches=4"):
        load_config(None, ["mesh.microbatches=4"])


def test_divisibility_error_names_field_axis_and_sizes() -> None:
    model = abstract_model(cfg_for({}, num_kv_heads=2).model)
    rules = resolve_rules(ShardingConfig())
    mesh = make_abstract_mesh(MeshConfig(data=2, tensor=4), 8)
    with pytest.raises(ConfigError) as e:
        check_divisible(nnx.state(model, nnx.Param), logical_axes(model), rules, mesh,
                        cfg_for({}, num_kv_heads=2).model)
    assert str(e.value).startswith("model.num_kv_heads=2 is not divisible by mesh.tensor=4 "
                                   "(logical axis kv_heads -> tensor")
    # replicating kv heads (Megatron's choice when tensor > kv heads) is the documented way out
    check_divisible(nnx.state(model, nnx.Param), logical_axes(model), {**rules, "kv_heads": ()}, mesh)
    with pytest.raises(ConfigError, match=r"data.global_batch_size.*micro batch 6 is not divisible by 4"):
        build_training(config_from_dict({"model": MODEL, "mesh": dict(data=2, fsdp=2, tensor=2),
                                                 "data": dict(seq_len=32, global_batch_size=6)}),
                               make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))


def test_zero1_adds_data_to_largest_divisible_dim() -> None:
    sizes = {"data": 2, "pipeline": 1, "fsdp": 2, "tensor": 2}
    assert add_axis_to_largest_dim(P(None, "fsdp", "tensor"), (4, 64, 256), sizes) == \
        P(None, "fsdp", ("tensor", "data"))
    assert add_axis_to_largest_dim(P(), (3, 5), sizes) == P()  # nothing divisible: unchanged
    assert add_axis_to_largest_dim(P("data"), (8,), sizes) == P("data")  # already on data
    assert add_axis_to_largest_dim(P(), (6, 8), {"data": 1}) == P()  # data of size 1
    assert add_axis_to_largest_dim(P(), (6, 4), sizes) == P("data")  # 6/2 ok, largest


def test_constrain_is_identity_without_rules_and_shards_with_them() -> None:
    x = jnp.ones((8, 4, 16))
    assert constrain(x, ACT_AXES) is x
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rules = resolve_rules(ShardingConfig(sequence_parallel=True))
    with use_rules(mesh, rules):
        y = jax.jit(lambda a: constrain(a * 2, ACT_AXES))(x)
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), "tensor")), 3)
    assert constrain(x, ACT_AXES) is x  # context restored
    with use_rules(mesh, rules):  # batch 1 / odd length: those dims stay replicated, no error
        z = jax.jit(lambda a: constrain(a + 1, ACT_AXES))(jnp.ones((1, 5, 16)))
    assert z.sharding.is_equivalent_to(NamedSharding(mesh, P()), 3)


# --------------------------------------------------------------------------- measured shardings

MIXED = dict(data=2, fsdp=2, tensor=2, zero1=True)

# What the rules must give on data 2 x fsdp 2 x tensor 2 (pipeline 1 dropped), written by hand.
EXPECTED_PARAMS = {
    "embed": P("tensor", "fsdp"),
    "lm_head": P("fsdp", "tensor"),
    "final_norm_scale": P(), "final_norm_bias": P(),
    "blocks/q": P(None, "fsdp", "tensor"), "blocks/k": P(None, "fsdp", "tensor"),
    "blocks/v": P(None, "fsdp", "tensor"), "blocks/o": P(None, "tensor", None, "fsdp"),
    "blocks/up": P(None, "fsdp", "tensor"), "blocks/down": P(None, "tensor", "fsdp"),
    "blocks/attn_norm_scale": P(), "blocks/attn_norm_bias": P(),
    "blocks/mlp_norm_scale": P(), "blocks/mlp_norm_bias": P(),
}
# ZeRO-1: Adam's mu / nu additionally split over data on the largest per-device dim.
EXPECTED_ZERO1 = {
    "embed": P(("tensor", "data"), "fsdp"),  # (128, 64): per device 64 x 32
    "lm_head": P("fsdp", ("tensor", "data")),
    "final_norm_scale": P("data"), "final_norm_bias": P("data"),
    "blocks/q": P(None, ("fsdp", "data"), "tensor"), "blocks/k": P(None, ("fsdp", "data"), "tensor"),
    "blocks/v": P(None, ("fsdp", "data"), "tensor"),
    "blocks/o": P(None, "tensor", None, ("fsdp", "data")),  # (4, 8, 8, 64): 64/2 is largest
    "blocks/up": P(None, "fsdp", ("tensor", "data")), "blocks/down": P(None, ("tensor", "data"), "fsdp"),
    "blocks/attn_norm_scale": P(None, "data"), "blocks/attn_norm_bias": P(None, "data"),
    "blocks/mlp_norm_scale": P(None, "data"), "blocks/mlp_norm_bias": P(None, "data"),
}


def _name(path) -> str:
    keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return "/".join(k for k in keys if k != "value")


def _param_name(path) -> str:
    name = _name(path)
    for short in sorted(EXPECTED_PARAMS, key=len, reverse=True):
        if name.endswith(short):
            return short
    return ""


@pytest.fixture(scope="module")
def mixed_state():
    cfg = cfg_for(MIXED)
    mesh = make_mesh(cfg.mesh)
    st = build_training(cfg, mesh)
    return cfg, mesh, st, st.init_state(0)


def _check(arr: jax.Array, spec: P, mesh, where: str) -> None:
    expected = NamedSharding(mesh, spec)
    assert arr.sharding.is_equivalent_to(expected, arr.ndim), f"{where}: {arr.sharding.spec} != {spec}"
    assert arr.addressable_shards[0].data.shape == expected.shard_shape(arr.shape), where


def test_every_param_and_opt_leaf_sharded_as_rules_say(mixed_state) -> None:
    cfg, mesh, st, state = mixed_state
    params = jax.tree_util.tree_flatten_with_path(state.params)[0]
    assert {_name(p) for p, _ in params} == set(EXPECTED_PARAMS)
    for path, arr in params:
        _check(arr, EXPECTED_PARAMS[_name(path)], mesh, _name(path))
    checked_moments = 0
    for path, arr in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
        if arr.ndim == 0:  # Adam's step count and friends
            _check(arr, P(), mesh, _name(path))
            continue
        short = _param_name(path)
        assert short, f"optimizer leaf {_name(path)} shadows no parameter"
        _check(arr, EXPECTED_ZERO1[short], mesh, _name(path))
        checked_moments += 1
    assert checked_moments == 2 * len(EXPECTED_PARAMS)  # mu and nu for every parameter
    _check(state.step, P(), mesh, "step")
    # the step keeps every sharding (out_shardings = in_shardings, state donated)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 128, (1, 8, 32)).astype(np.int32)
    batch = st.global_batch(dict(input_ids=ids[0], targets=ids[0], loss_mask=np.ones((8, 32), np.float32),
                                 positions=np.broadcast_to(np.arange(32, dtype=np.int32), (8, 32)).copy(),
                                 segment_ids=np.ones((8, 32), np.int32)), 1, 8)
    assert batch["input_ids"].sharding.is_equivalent_to(NamedSharding(mesh, P(None, ("data", "fsdp"))), 3)
    new_state, metrics = st.step(jax.tree.map(lambda a: a.copy(), state), batch)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(new_state)[0], jax.tree.leaves(state)):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), _name(path)
    assert np.isfinite(float(metrics["loss"]))


def test_init_never_materialises_the_whole_state_on_one_device() -> None:
    """Params are created sharded: the compiled init's per-device output is 1/8 of the state
    and its scratch memory stays far below the full state (no device builds it all)."""
    cfg = cfg_for(dict(data=1, fsdp=4, tensor=2), vocab_size=8192, hidden_size=512, num_heads=8,
                  num_kv_heads=8, head_dim=64, ffn_hidden_size=2048)
    st = build_training(cfg, make_mesh(cfg.mesh))
    full = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(st.abstract_state))
    mem = st.init_jit.lower(jnp.asarray(0, jnp.uint32)).compile().memory_analysis()
    assert mem.output_size_in_bytes <= full / 8 * 1.01
    assert mem.temp_size_in_bytes < full / 4


def test_tree_shardings_from_model_logical_axes(mixed_state) -> None:
    _, mesh, _, state = mixed_state
    model = abstract_model(cfg_for(MIXED).model)
    shardings = tree_shardings(logical_axes(model), resolve_rules(ShardingConfig()), mesh)
    flat = {"/".join(str(getattr(k, "key", k)) for k in p): s for p, s in
            jax.tree_util.tree_flatten_with_path(shardings)[0]}
    assert set(flat) == set(EXPECTED_PARAMS)
    for name, sharding in flat.items():
        assert sharding.spec == EXPECTED_PARAMS[name], name


def test_zero1_off_shards_optimizer_state_like_params() -> None:
    cfg = cfg_for({**MIXED, "zero1": False})
    st = build_training(cfg, make_mesh(cfg.mesh))
    for path, spec in jax.tree_util.tree_flatten_with_path(
            st.state_specs.opt_state, is_leaf=lambda x: isinstance(x, P))[0]:
        short = _param_name(path)
        assert spec == (EXPECTED_PARAMS[short] if short else P()), _name(path)


def test_memory_estimate_equals_measured_shards(mixed_state) -> None:
    cfg, mesh, st, state = mixed_state
    est = training_state_bytes(cfg, 8)
    assert est["mesh"] == {"data": 2, "pipeline": 1, "fsdp": 2, "tensor": 2}

    def device0_bytes(tree) -> int:
        return sum(next(s.data.nbytes for s in a.addressable_shards if s.device.id == 0)
                   for a in jax.tree.leaves(tree))

    got = est["per_device_bytes"]
    assert got["params"] == device0_bytes(state.params)
    assert got["optimizer_state"] == device0_bytes(state.opt_state)
    assert got["gradients"] == got["params"]  # fp32 params: accumulator same size
    assert got["master_weights"] == 0
    # ZeRO-1 halves the moments relative to the params' sharding (data = 2), except the count
    assert got["optimizer_state"] < 2 * got["params"]


def test_bf16_params_get_zero1_sharded_fp32_master() -> None:
    cfg = cfg_for(MIXED, param_dtype="bfloat16")
    st = build_training(cfg, make_mesh(cfg.mesh))
    master = st.abstract_state.opt_state.master
    spec = st.state_specs.opt_state.master
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(master))
    assert spec["blocks"]["up"].get_value() == EXPECTED_ZERO1["blocks/up"]
    est = training_state_bytes(cfg, 8)["per_device_bytes"]
    # fp32 is twice bf16, and ZeRO-1 splits the master over data=2: same bytes as the params
    assert est["master_weights"] == est["params"]
    est_off = training_state_bytes(cfg_for({**MIXED, "zero1": False}, param_dtype="bfloat16"), 8)
    assert est_off["per_device_bytes"]["master_weights"] == 2 * est["params"]


def test_zero2_gradient_is_the_optimizer_states_shard() -> None:
    """ZeRO-2: the reduced fp32 gradient of every parameter is sharded exactly like its ZeRO-1
    optimizer state (so the update needs no resharding), 1/data of the local accumulator where
    data divides; without ZeRO-2 it is sharded like the parameter. zero2 needs zero1."""
    cfg = cfg_for({**MIXED, "zero2": True}, param_dtype="bfloat16")
    st = build_training(cfg, make_mesh(cfg.mesh))
    grad_specs = st.gradient_layout.grad_specs
    assert st.gradient_layout.manual == ("data",)  # fsdp shards parameters: left to the partitioner
    for path, spec in jax.tree_util.tree_flatten_with_path(grad_specs, is_leaf=lambda x: isinstance(x, P))[0]:
        assert spec == EXPECTED_ZERO1[_param_name(path)], _name(path)
    est = training_state_bytes(cfg, 8)["per_device_bytes"]
    assert est["reduced_gradients"] < est["gradients"] / 1.9  # data = 2 (norm vectors too: 64 / 2)
    off = training_state_bytes(cfg_for(MIXED, param_dtype="bfloat16"), 8)["per_device_bytes"]
    assert off["reduced_gradients"] == off["gradients"]
    with pytest.raises(ConfigError, match="sharding.zero2=true needs sharding.zero1=true"):
        cfg_for({**MIXED, "zero1": False, "zero2": True})


def test_fp32_master_rounds_from_fp32_not_from_bf16() -> None:
    tx = with_fp32_master(optax.sgd(1.0))
    params = {"w": jnp.asarray([1.0, 1.0], jnp.bfloat16)}
    state = tx.init(params)
    tiny = {"w": jnp.asarray([-1e-3, -1e-3], jnp.bfloat16)}  # below bf16 resolution at 1.0
    for _ in range(10):
        upd, state = tx.update(tiny, state, params)
        params = optax.apply_updates(params, upd)
    assert params["w"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(state.master["w"]), 1.01, rtol=1e-5)
    # plain bf16 SGD would be stuck at 1.0; the master copy accumulates and rounds up
    assert float(params["w"][0]) == float(jnp.asarray(1.01, jnp.bfloat16))


# --------------------------------------------------------------------------- info command


def _info(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main(["info", *argv])
    return rc, out.getvalue(), err.getvalue()


def test_info_reports_per_device_bytes_without_devices() -> None:
    # 64 devices on a machine with 8: the mesh is abstract
    rc, out, _ = _info("tiny", "--mesh-devices", "64", "mesh.tensor=2", "mesh.fsdp=4", "sharding.zero1=false")
    assert rc == 0
    mem = json.loads(out)["memory"]
    assert mem["mesh"] == {"data": 8, "pipeline": 1, "fsdp": 4, "tensor": 2}
    total = json.loads(out)["parameters"]["total"]
    tiny = load_config("tiny").model
    norms = (4 * tiny.num_layers + 2) * tiny.hidden_size  # LayerNorm1P scales/biases: replicated
    # every other tiny weight splits exactly 8 ways (fsdp 4 x tensor 2); fp32 = 4 bytes
    params = mem["per_device_bytes"]["params"]
    assert params == (total - norms) * 4 // 8 + norms * 4
    # zero1 off: mu and nu sharded like the params, plus a few int32 step counts
    assert 0 < mem["per_device_bytes"]["optimizer_state"] - 2 * params <= 4 * 4
    # the pipelined step's schedule and bubble: 2 stages, 2 slices x 4 microbatches in one flush
    rc, out, _ = _info("tiny", "--mesh-devices", "8", "mesh.pipeline=2", "pipeline.microbatches=4",
                       "data.global_batch_size=32", "data.micro_batch_size=16")
    pipe = json.loads(out)["pipeline"]
    assert rc == 0 and pipe["microbatches_per_flush"] == 8 and pipe["bubble_fraction"] == round(1 / 9, 6)
    rc, _, err = _info("tiny", "--mesh-devices", "8", "mesh.pipeline=2", "pipeline.microbatches=4",
                       "data.global_batch_size=8")  # 8 rows over data 4: 2 per device, not 4 microbatches
    assert rc == 2 and "multiple of 16" in err
    rc, _, err = _info("tiny", "--mesh-devices", "64", "mesh.tensor=4")
    assert rc == 2 and "model.num_kv_heads=2 is not divisible by mesh.tensor=4" in err
    rc, _, err = _info("tiny", "--mesh-devices", "6", "mesh.tensor=4")
    assert rc == 2 and "does not divide the 6 available devices" in err


# --------------------------------------------------------------------------- distributed setup


def test_distributed_settings_sources() -> None:
    assert resolve_settings({}, {}) == ("single", {})
    src, kw = resolve_settings({}, {"NEMOJAX_COORDINATOR": "10.0.0.1:1234", "NEMOJAX_NUM_PROCESSES": "4",
                                    "NEMOJAX_PROCESS_ID": "3", "NEMOJAX_LOCAL_DEVICE_IDS": "0,1"})
    assert src == "nemojax_env" and kw == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                                           "process_id": 3, "local_device_ids": [0, 1]}
    src, kw = resolve_settings({}, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2",
                                    "JAX_PROCESS_ID": "0"})
    assert src == "jax_env" and kw["num_processes"] == 2
    src, kw = resolve_settings({"coordinator_address": "a:1", "num_processes": 2, "process_id": 1},
                               {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2",
                                "JAX_PROCESS_ID": "0"})
    assert src == "explicit" and kw["process_id"] == 1
    assert resolve_settings({}, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}) == ("slurm", {})
    assert resolve_settings({}, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) == ("single", {})
    assert resolve_settings({}, {"OMPI_COMM_WORLD_SIZE": "4"}) == ("mpi", {})
    # a TPU slice of several hosts is a job; one named host (e.g. `nemojax compile` naming this
    # CPU host to libtpu) is not
    assert resolve_settings({}, {"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3", "TPU_WORKER_ID": "1"}) == ("tpu", {})
    assert resolve_settings({}, {"TPU_WORKER_HOSTNAMES": "localhost", "TPU_ACCELERATOR_TYPE": "v5p-8"}) == \
        ("single", {})
    assert resolve_settings({}, {"NEMOJAX_DISTRIBUTED": "off", "SLURM_JOB_ID": "7",
                                 "SLURM_NTASKS": "16"}) == ("single", {})
    with pytest.raises(ConfigError, match=r"incomplete: missing \['process_id'\]"):
        resolve_settings({}, {"NEMOJAX_COORDINATOR": "h:1", "NEMOJAX_NUM_PROCESSES": "2"})
    with pytest.raises(ConfigError, match=r"process_id=2 must be in \[0, num_processes=2\)"):
        resolve_settings({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, {})
