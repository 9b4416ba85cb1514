"""Every parallel layout computes what one device computes, in fp32 and in the precision shipped.

Adam with gradient clipping is scale-invariant, so comparing Adam steps hides a gradient that is
off by a constant factor (a sharded reduction that sums 8 replicas instead of averaging them
still passes). Here each layout runs 2 plain SGD steps (no momentum, no clipping) of the full
sharded train step (`Training.step`, what `nemojax train` runs) with 2 gradient-accumulation
slices, and every parameter's gradient of each step, read back from the update
(g = (w_before - w_after) / lr, on the fp32 weights or the fp32 master copy), is compared with a
single-device reference written here from the formula: `jax.grad` of the mean token loss of the
whole batch in one forward (no accumulation, nothing from nemojax.train or nemojax.parallel),
and the SGD update written out (fp32 weights, or an fp32 copy rounded to bf16 after each step).
A scale error in the shared accumulation or reduction code therefore cannot cancel out:

* fp32 weights and compute (pipeline 2 x tensor 2 x data 2 in the default suite, every layout
  with `-m slow`): per parameter max |g - g_ref| <= 2e-5 * max |g_ref| (reduction-order
  noise of fp32 sums), plus the resolution of reading g back from fp32 weights (half an ulp of
  the updated weight, over lr);
* the 15B/340B presets' mixed precision (bf16 weights and compute, fp32 master copy, fp32
  gradient accumulation and reduction): bf16 rounds to 8 significant bits at every op (unit
  roundoff u = 2^-8), and a layout rounds different partial sums (rows split over data, heads
  over tensor, all-reduced bf16 activations) than one device does. How far that moves a
  gradient is measured, per parameter, as the distance e_ref = ||g_bf16 - g_fp32|| / ||g_fp32||
  between the reference's bf16 gradient and the same gradient computed in fp32 from the same
  (bf16) weights -- about 1% here, i.e. a few u accumulated over the forward and backward
  passes. A layout is a different bf16 rounding of the same sum, so its distance to the
  single-device bf16 run is at most its own error plus e_ref; the test allows 2.5 e_ref per
  parameter for the first step (measured: 0.9 - 1.6 e_ref on the layouts below). The second
  step's gradient is taken at weights that already differ by the first step's rounding, so
  per-parameter noise no longer bounds it: it gets 2.5 x the largest e_ref of the step (measured:
  up to 1.9 x). Any scale error in the
  reduction (dividing by the slices twice: x 1/2, a mean instead of a sum over data: x 1/8)
  moves every gradient by >= 50%, i.e. ~50 e_ref.

Mutants tried and killed: the step's gradient divided by the slice count twice
(nemojax.train.step), the data-parallel all-reduce replaced by a mean (pmean: the reduction's
scale lost), the pipeline's head/norm gradients overwritten per microbatch instead of added.
`test_a_misscaled_gradient_is_caught` applies such a mutant (the objective scaled by
1/slices, as if the sums were divided by the slice count twice) to the mixed-precision ZeRO-2
data-parallel step and checks that both the gradient and the parameter comparisons fail, and that
an Adam + clipping comparison would not have seen it.

The model is tiny (8 layers so that every pipeline layout divides it) and the batch holds two
packed documents per row and masked tail positions. 8 fake CPU devices (tests/conftest.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nemojax.config import config_from_dict
from nemojax.model.transformer import NemotronLM
from nemojax.parallel.mesh import make_mesh
from nemojax.train.build import PRETRAIN, build_training
from nemojax.train.step import create_train_state, lm_loss_sums, make_train_step
from reference_run import flat_params, packed_batch

SEQ, MICRO, ACCUM, STEPS = 32, 8, 2, 2
LR = 0.5  # plain SGD: big enough that a scale error moves the parameters far beyond fp32 noise
GRAD_RTOL = 2e-5  # fp32: |g - ref| <= GRAD_RTOL * max|ref|, per parameter
BF16_FACTOR = 2.5  # bf16: ||g - ref|| <= BF16_FACTOR * e_ref, per parameter (module docstring)

MODEL = dict(vocab_size=128, hidden_size=64, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=8,
             ffn_hidden_size=128, max_seq_len=SEQ, init_std=0.05)
BF16 = dict(param_dtype="bfloat16", compute_dtype="bfloat16")

LAYOUTS: dict[str, dict[str, Any]] = {
    "data8_zero2": {"mesh": dict(data=8), "sharding": dict(zero1=True, zero2=True)},
    "fsdp8": {"mesh": dict(data=1, fsdp=8)},
    "tensor8": {"mesh": dict(data=1, tensor=8), "sharding": dict(rules={"kv_heads": None})},
    "tensor4_data2_no_zero": {"mesh": dict(data=2, tensor=4), "sharding": dict(zero1=False)},
    "data2_fsdp2_tensor2_seqpar_zero1": {"mesh": dict(data=2, fsdp=2, tensor=2),
                                         "sharding": dict(zero1=True, sequence_parallel=True)},
    "pp2_tp2_dp2_v2_zero2": {"mesh": dict(data=2, pipeline=2, tensor=2), "sharding": dict(zero2=True),
                             "pipeline": dict(virtual_stages=2, microbatches=2)},
}
SLOW_LAYOUTS: dict[str, dict[str, Any]] = {
    "pp4_v2_dp2": {"mesh": dict(data=2, pipeline=4), "pipeline": dict(virtual_stages=2, microbatches=4)},
    "pp2_v1_fsdp2_tp2": {"mesh": dict(data=1, fsdp=2, pipeline=2, tensor=2), "pipeline": dict(microbatches=4)},
    "pp8_v1_m8": {"mesh": dict(data=1, pipeline=8), "pipeline": dict(microbatches=8)},
    "pp_fill_tp4": {"mesh": dict(data=1, pipeline=-1, tensor=4), "pipeline": dict(microbatches=2)},
}
FP32_DEFAULT = ("pp2_tp2_dp2_v2_zero2",)  # the path with the most parts; the other layouts: slow


def make_cfg(layout: dict[str, Any], model: dict[str, Any]):
    return config_from_dict({"model": {**MODEL, **model}, "mesh": layout["mesh"],
                             "sharding": layout.get("sharding", {}), "pipeline": layout.get("pipeline", {}),
                             "steps": STEPS, "data": dict(seq_len=SEQ, global_batch_size=MICRO * ACCUM,
                                                          micro_batch_size=MICRO)})


def make_batch() -> dict[str, np.ndarray]:
    """[ACCUM, MICRO, SEQ] fields."""
    b = packed_batch(MODEL["vocab_size"], ACCUM * MICRO, SEQ, seed=1234, cut=SEQ // 2 + 3, masked_tail=3)
    return {k: v.reshape(ACCUM, MICRO, *v.shape[2:]) for k, v in b.items()}


def weights(state: Any) -> dict[str, np.ndarray]:
    """The fp32 weights SGD moves: the master copy when the params are stored in bf16."""
    master = getattr(state.opt_state, "master", None)
    return flat_params(state.params if master is None else master)


def sgd_run(step: Any, state: Any, batch: Any) -> dict[str, Any]:
    """STEPS steps: the gradient of each (read back from its update), the resolution of that
    reading (half an ulp of the updated weight, over lr), the losses, the final state."""
    grads, resolution, losses, w = [], [], [], weights(state)
    for _ in range(STEPS):
        state, m = step(state, batch)
        new = weights(state)
        grads.append({k: (w[k] - new[k]) / LR for k in w})
        resolution.append({k: np.spacing(np.abs(new[k])) / (2 * LR) for k in w})
        losses.append(float(m["loss"]))
        w = new
    return {"grads": grads, "resolution": resolution, "losses": losses, "state": state}


def full_batch_loss(graphdef: Any, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
    """The step's mean next-token loss over ALL its rows in one forward, written here from the
    formula (no accumulation, no nemojax.train): -sum(log softmax(logits)[target] * mask) / sum(mask)."""
    b = {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()}
    logits = nnx.merge(graphdef, params)(b["input_ids"], positions=b["positions"], segment_ids=b["segment_ids"])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, b["targets"][..., None], axis=-1)[..., 0]
    return -jnp.sum(picked * b["loss_mask"]) / jnp.sum(b["loss_mask"])


def single_device(model: dict[str, Any]) -> dict[str, Any]:
    """STEPS plain SGD steps on device 0 on the full-batch gradient, the update written out: an
    fp32 copy w of the weights moves by -lr * g and the stored weights are w in their dtype.
    Independent of the step under test: a scale error in its accumulation or reduction cannot
    cancel against the same error here."""
    cfg = make_cfg({"mesh": dict(data=1)}, model)
    graphdef, params = nnx.split(NemotronLM(cfg.model, rngs=nnx.Rngs(params=jax.random.key(cfg.seed))), nnx.Param)
    dev = jax.devices()[0]
    params, batch = jax.device_put(params, dev), jax.device_put(make_batch(), dev)
    value_and_grad = jax.jit(jax.value_and_grad(lambda p, b: full_batch_loss(graphdef, p, b)))
    start = params
    master = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    grads, resolution, losses = [], [], []
    for _ in range(STEPS):
        loss, g = value_and_grad(params, batch)
        master = jax.tree.map(lambda w, d: w - LR * d.astype(jnp.float32), master, g)
        params = jax.tree.map(lambda w, p: w.astype(p.dtype), master, params)
        grads.append({k: v.astype(np.float32) for k, v in flat_params(g).items()})
        resolution.append({k: np.spacing(np.abs(v)) / (2 * LR) for k, v in flat_params(master).items()})
        losses.append(float(loss))
    return {"grads": grads, "resolution": resolution, "losses": losses, "final": flat_params(master),
            "start": start, "value_and_grad": value_and_grad}


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    """fp32 and bf16 single-device runs, and e_ref: the bf16 run's first gradient against the
    same gradient computed in fp32 from the same (bf16-valued) weights."""
    run32, run16 = single_device({}), single_device(BF16)
    assert run32["losses"][1] < run32["losses"][0], "the reference must learn"
    batch = jax.device_put(make_batch(), jax.devices()[0])
    exact = flat_params(run32["value_and_grad"](jax.tree.map(lambda a: a.astype(jnp.float32), run16["start"]),
                                                batch)[1])
    g16 = run16["grads"][0]
    e_ref = {k: float(np.linalg.norm(g16[k] - exact[k]) / np.linalg.norm(exact[k])) for k in exact}
    assert 0 < max(e_ref.values()) < 0.05, e_ref  # bf16 noise: present, and a few u
    return {"fp32": run32, "bf16": run16, "e_ref": e_ref}


def assert_grads_match(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], what: str,
                       e_ref: dict[str, float] | None = None, resolution: dict[str, np.ndarray] | None = None
                       ) -> None:
    """fp32 (e_ref None): max error <= GRAD_RTOL * scale (+ the read-back resolution, elementwise);
    bf16: relative L2 error <= BF16_FACTOR * e_ref[k]."""
    assert got.keys() == ref.keys(), what
    for k in ref:
        scale = float(np.abs(ref[k]).max())
        assert scale > 0, f"{what}: reference gradient of {k} is zero"
        if e_ref is None:
            excess = np.abs(got[k] - ref[k]) - (0 if resolution is None else 2 * resolution[k])
            err = float(excess.max())
            assert err <= GRAD_RTOL * scale, f"{what}: gradient of {k} off by {err:.3e} (scale {scale:.3e})"
        else:
            rel = float(np.linalg.norm(got[k] - ref[k]) / np.linalg.norm(ref[k]))
            assert rel <= BF16_FACTOR * e_ref[k], \
                f"{what}: gradient of {k} off by {rel:.4f} relative, bf16 noise e_ref {e_ref[k]:.4f}"


def run_layout(layout: dict[str, Any], model: dict[str, Any], task=PRETRAIN, with_gradients: bool = False,
               cfg: Any = None) -> dict[str, Any]:
    cfg = make_cfg(layout, model) if cfg is None else cfg
    training = build_training(cfg, make_mesh(cfg.mesh), task=task, tx=optax.sgd(LR))
    state = training.init_state(cfg.seed)
    batch = training.global_batch({k: v.reshape(ACCUM * MICRO, *v.shape[2:]) for k, v in make_batch().items()},
                                  ACCUM, MICRO)
    out = {"training": training}
    if with_gradients:  # the public gradient API (Training.gradients), before any step
        out["gradients"] = flat_params(training.gradients(state.params, batch)[0])
    return {**out, **sgd_run(training.step, state, batch)}


def check(name: str, layout: dict[str, Any], precision: str, reference: dict[str, Any]) -> None:
    model = BF16 if precision == "bf16" else {}
    out = run_layout(layout, model, with_gradients=name == "pp2_tp2_dp2_v2_zero2" and precision == "fp32")
    ref = reference[precision]
    e_ref = reference["e_ref"] if precision == "bf16" else None
    for i in range(STEPS):
        noise = e_ref if e_ref is None or i == 0 else dict.fromkeys(e_ref, max(e_ref.values()))
        assert_grads_match(out["grads"][i], ref["grads"][i], f"{name} {precision} step {i}", noise,
                           ref["resolution"][i])
    if "gradients" in out:
        assert_grads_match(out["gradients"], ref["grads"][0], f"{name} Training.gradients")
    tol = 2e-5 if e_ref is None else 1e-2  # the loss is a mean: bf16 rounding averages out
    np.testing.assert_allclose(out["losses"], ref["losses"], rtol=tol, err_msg=f"{name} {precision}")
    # the layout really is distributed: the batch is split over data x fsdp, and the parameters
    # over fsdp / tensor / pipeline whenever one of those is used
    tr, state = out["training"], out["state"]
    sizes = dict(tr.mesh.shape)
    assert tr.batch_divisor == sizes["data"] * sizes["fsdp"]
    if sizes["fsdp"] * sizes["tensor"] * sizes["pipeline"] > 1:
        leaves = jax.tree.leaves(state.params)
        full = sum(a.nbytes for a in leaves)
        dev0 = sum(next(s.data.nbytes for s in a.addressable_shards if s.device.id == 0) for a in leaves)
        assert dev0 <= full / 2, f"{name}: device 0 holds {dev0} of {full} parameter bytes"
    if tr.mesh.shape["pipeline"] > 1:  # pipelined, and the block weights split over the stages
        assert tr.schedule is not None and tr.schedule.P == tr.mesh.shape["pipeline"]
        up = state.params["blocks"]["up"][...]
        assert up.sharding.spec[0] == "pipeline"
        assert up.addressable_shards[0].data.shape[0] == MODEL["num_layers"] // tr.schedule.P


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_one_device_in_mixed_precision(name: str, reference) -> None:
    check(name, LAYOUTS[name], "bf16", reference)


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n in FP32_DEFAULT else [pytest.mark.slow])
                                  for n in LAYOUTS])
def test_layout_matches_one_device_in_fp32(name: str, reference) -> None:
    check(name, LAYOUTS[name], "fp32", reference)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", list(SLOW_LAYOUTS))
def test_more_pipeline_layouts_match_one_device(name: str, precision: str, reference) -> None:
    check(name, SLOW_LAYOUTS[name], precision, reference)


def test_a_misscaled_gradient_is_caught(reference) -> None:
    """The mixed-precision ZeRO-2 data-parallel step with its gradient divided by the slice count
    once more (the objective scaled by 1/ACCUM) fails both the gradient and the parameter
    comparison -- and would have passed an Adam + clipping comparison."""
    def divided_twice(graphdef, params, mb):
        num, den, extras = lm_loss_sums(graphdef, params, mb)
        return num / ACCUM, den, extras

    out = run_layout(LAYOUTS["data8_zero2"], BF16, dataclasses.replace(PRETRAIN, loss_sums=divided_twice))
    ref, e_ref = reference["bf16"], reference["e_ref"]
    with pytest.raises(AssertionError, match="gradient of"):
        assert_grads_match(out["grads"][0], ref["grads"][0], "x 1/2", e_ref)
    final = weights(out["state"])
    expected = ref["final"]
    worst = max(float(np.linalg.norm(final[k] - expected[k])) for k in final)
    assert worst > 10 * max(float(np.linalg.norm(LR * BF16_FACTOR * e_ref[k] * ref["grads"][0][k]))
                            for k in final), "the halved gradient left the parameters where they should be"
    # Why the comparison must not use Adam with clipping: the same error leaves those
    # parameters where the correct gradient puts them.
    adam = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
    params = {k: jnp.asarray(v) for k, v in expected.items()}
    g = {k: jnp.asarray(v) for k, v in ref["grads"][0].items()}
    moved = []
    for scale in (1.0, 1.0 / ACCUM):
        upd, _ = adam.update(jax.tree.map(lambda x: scale * x, g), adam.init(params), params)
        moved.append(optax.apply_updates(params, upd))
    for k in params:
        np.testing.assert_allclose(np.asarray(moved[1][k]), np.asarray(moved[0][k]), rtol=0, atol=1e-6)


def test_pipelined_lora_trains_only_adapters_like_one_device() -> None:
    """The 1F1B step with a trainable subset (LoRA adapters; frozen base weights are closed over,
    the embedding and heads get no gradient): SFT on pipeline 2 x tensor 2 x data 2, V 2, equals
    one device after 2 SGD steps, and only adapters move. In the default suite (about 10 s) as the
    one check of a trainable subset through the sharded step: kills step.py's `trainable` dropped
    (or None) in `accumulate_gradients`' pipeline call, its ZeRO-2 gradient specs and its
    reduce-scatter's parameter subset."""
    from nemojax.train.tasks import stage_model, stage_task

    model = dict(MODEL, num_layers=4, lora={"rank": 4, "init_std": 0.05})

    def cfg_of(layout: dict[str, Any]):
        return config_from_dict({"model": model, "mesh": layout["mesh"], "pipeline": layout.get("pipeline", {}),
                                 "stage": {"kind": "sft", "train": "unused.jsonl"}, "steps": STEPS,
                                 "data": dict(seq_len=SEQ, global_batch_size=MICRO * ACCUM, micro_batch_size=MICRO)})

    cfg = cfg_of({"mesh": dict(data=1)})
    task = stage_task(cfg)
    graphdef, state = create_train_state(stage_model(cfg, nnx.Rngs(params=jax.random.key(cfg.seed))),
                                         optax.sgd(LR), task.trainable)
    start = flat_params(state.params)
    ref = sgd_run(jax.jit(make_train_step(graphdef, optax.sgd(LR), task.loss_sums, trainable=task.trainable)),
                  jax.device_put(state, jax.devices()[0]), jax.device_put(make_batch(), jax.devices()[0]))
    layout = cfg_of(LAYOUTS["pp2_tp2_dp2_v2_zero2"])
    got = run_layout({}, {}, task=stage_task(layout), cfg=layout)
    expected, final = flat_params(ref["state"].params), flat_params(got["state"].params)
    for k in expected:
        np.testing.assert_allclose(final[k], expected[k], rtol=0, atol=1e-6, err_msg=k)
        assert ("lora" in k) == (not np.array_equal(expected[k], start[k])), k
