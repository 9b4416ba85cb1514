"""How closely a model (e.g. a quantized one) follows a reference model on the same inputs.

* next-token agreement over held-out text: the mean KL(p_ref || p) of the next-token
  distributions, top-1 agreement (both argmaxes equal) and each model's mean NLL of the true
  next token, over the positions a mask selects;
* greedy-output agreement over generated continuations: the share of identical outputs and the
  mean share of each reference output reproduced before the first differing token.

vLLM and TensorRT-LLM report these for quantized checkpoints next to task scores, because a
task score over a few hundred prompts moves by whole standard errors from noise alone, while
KL and top-1 agreement measure the change in the model itself on every token.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def agreement_sums(ref_logits: jax.Array, logits: jax.Array, targets: jax.Array, mask: jax.Array,
                   ) -> dict[str, jax.Array]:
    """Sums over masked positions ([batch, seq] mask, [batch, seq, vocab] logits): KL(p_ref || p),
    top-1 agreement, each model's NLL of `targets`, and the count."""
    lr = jax.nn.log_softmax(ref_logits.astype(jnp.float32), axis=-1)
    lq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    m = mask.astype(jnp.float32)
    kl = jnp.sum(jnp.exp(lr) * (lr - lq), axis=-1)
    top1 = (jnp.argmax(lr, axis=-1) == jnp.argmax(lq, axis=-1)).astype(jnp.float32)
    nll_ref = -jnp.take_along_axis(lr, targets[..., None], axis=-1)[..., 0]
    nll = -jnp.take_along_axis(lq, targets[..., None], axis=-1)[..., 0]
    return {"kl": jnp.sum(kl * m), "top1": jnp.sum(top1 * m), "nll_ref": jnp.sum(nll_ref * m),
            "nll": jnp.sum(nll * m), "count": jnp.sum(m)}


def _forward(model: Any) -> Any:
    from flax import nnx

    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, ids, seg, pos: nnx.merge(graphdef, s)(ids, segment_ids=seg, positions=pos))
    return lambda ids, seg, pos: fn(state, ids, seg, pos)


def next_token_agreement(ref_model: Any, model: Any, batches: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
    """Mean next-token KL(p_ref || p), top-1 agreement and NLLs of `model` against `ref_model`.

    batches: dicts of [batch, seq] arrays `input_ids`, `targets`, `loss_mask` and optionally
    `segment_ids` and `positions` (packed documents): the pretraining batch fields.
    """
    ref_fwd, fwd = _forward(ref_model), _forward(model)
    sums_fn = jax.jit(agreement_sums)
    total: dict[str, float] = {}
    for b in batches:
        seg, pos = (None if b.get(k) is None else jnp.asarray(b[k]) for k in ("segment_ids", "positions"))
        ids = jnp.asarray(b["input_ids"])
        sums = sums_fn(ref_fwd(ids, seg, pos), fwd(ids, seg, pos), jnp.asarray(b["targets"]),
                       jnp.asarray(b["loss_mask"]))
        for k, v in sums.items():
            total[k] = total.get(k, 0.0) + float(v)
    n = max(total.get("count", 0.0), 1.0)
    return {"kl": total["kl"] / n, "top1_agreement": total["top1"] / n, "nll_ref": total["nll_ref"] / n,
            "nll": total["nll"] / n, "tokens": int(total["count"])}


def greedy_agreement(reference: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]) -> dict[str, float]:
    """Share of outputs identical to the reference's, and the mean share of each reference output
    reproduced before the first differing token (1.0 when identical)."""
    if len(reference) != len(outputs):
        raise ValueError(f"{len(reference)} reference outputs but {len(outputs)} outputs")
    same, prefix = 0, 0.0
    for r, o in zip(reference, outputs):
        r, o = list(r), list(o)
        same += r == o
        k = 0
        while k < min(len(r), len(o)) and r[k] == o[k]:
            k += 1
        prefix += 1.0 if r == o else k / max(len(r), 1)
    n = max(len(reference), 1)
    return {"identical": same / n, "prefix_match": prefix / n, "outputs": len(reference)}
