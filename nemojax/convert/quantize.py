"""Quantize a model's block projections at load time or once into a checkpoint (model.quant).

`load_model(path, quantize="fp8")` and `nemojax convert quantize` read the full-precision weights
one parameter at a time (nemojax: one orbax leaf per read, `checkpoint.iter_params`; Hugging Face:
`iter_hf_params`), quantize each projection as it arrives (`nemojax.model.quant.quantize`, jitted
with the output sharding of the values and the scale) and drop the full-precision array before
reading the next. Peak memory is the quantized model plus one full-precision stacked parameter.

A checkpoint saved from a quantized model (`save_model`) records `model.quant` in its config and
holds int8 / float8_e4m3fn values and fp32 scales: it loads without the original weights.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Iterable

from nemojax.config import ConfigError, ModelConfig, QuantConfig

SERVING_MODES = ("int8", "fp8")  # what the engine (generate / serve / eval / SDG) quantizes to


def quant_target(cfg: ModelConfig, mode: str | None, block_size: int = 0, *, where: str = "the checkpoint",
                 ) -> QuantConfig | None:
    """The QuantConfig to quantize `cfg`'s model to, or None to load it as stored.

    mode None / "" / "none": as stored (a quantized checkpoint stays quantized). A checkpoint
    already quantized differently is refused (quantizing quantized values again would compound
    the error); the same mode and block size are a no-op.
    """
    if not mode or mode == "none":
        return None
    target = QuantConfig(mode=mode, block_size=block_size)
    if cfg.quant.enabled:
        if (cfg.quant.mode, cfg.quant.block_size) == (mode, block_size):
            return None
        raise ConfigError(f"{where} is already quantized ({cfg.quant.mode}, block_size {cfg.quant.block_size}); "
                          f"load it without --quantize, or quantize the original weights to {mode}")
    dataclasses.replace(cfg, quant=target).validate("model")  # the block size fits every projection
    return target


def _put(tree: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _sharding(sharding: Any, keys: tuple[str, ...]) -> Any:
    import jax

    node = sharding
    if isinstance(sharding, dict):
        for k in keys:
            node = node[k]
    return node if node is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])


def quantize_stream(items: Iterable[tuple[tuple[str, ...], Any]], target: QuantConfig, sharding: Any = None,
                    ) -> dict[str, Any]:
    """The params pure-dict of the quantized model from (path, full-precision array) pairs.

    sharding: one Sharding, a params-shaped dict for the QUANTIZED model (values and scales), or
    None (first device). Each source array is released before the next is read.
    """
    import jax

    from nemojax.model import quant

    out: dict[str, Any] = {}
    for keys, arr in items:
        if len(keys) == 2 and keys[0] == "blocks" and keys[1] in quant.QUANT_TARGETS:
            t = keys[1]
            scale_keys = ("blocks", quant.scale_name(t))
            fn = jax.jit(partial(quant.quantize, mode=target.mode, n_in=quant.N_IN[t],
                                 block_size=target.block_size, layered=True),
                         out_shardings=quant.QArray(_sharding(sharding, keys), _sharding(sharding, scale_keys)))
            qa = fn(arr)
            _put(out, keys, qa.values)
            _put(out, scale_keys, qa.scale)
        else:
            _put(out, keys, jax.device_put(arr, _sharding(sharding, keys)))
        del arr
    return out


def build(cfg: ModelConfig, params: dict[str, Any]) -> Any:
    """The model (language or reward) of `cfg` holding `params`."""
    from flax import nnx

    from nemojax.model.reward import make_abstract_model

    graphdef, state = nnx.split(make_abstract_model(cfg))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def quantize_model(model: Any, mode: str, block_size: int = 0, *, sharding: Any = None) -> Any:
    """An in-memory model with its block projections quantized (a new model; `model` is unchanged).

    The model must have no adapters (merge them first: `nemojax.model.lora.merge_lora`).
    """
    import jax
    from flax import nnx

    cfg: ModelConfig = model.cfg
    if cfg.lora.rank:
        raise ValueError("merge the LoRA adapters first (nemojax.model.lora.merge_lora), then quantize")
    target = quant_target(cfg, mode, block_size, where="this model")
    if target is None:
        return model
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    items = ((tuple(k.key for k in path), leaf) for path, leaf in flat)
    return build(dataclasses.replace(cfg, quant=target), quantize_stream(items, target, sharding))


def convert_quantize(ckpt: str | Any, out_dir: str | Any, *, mode: str, block_size: int = 0,
                     param_dtype: str | None = None, overwrite: bool = False, progress: bool = True) -> Any:
    """Any checkpoint `nemojax.load` accepts -> a quantized nemojax model checkpoint (config.yaml with
    `model.quant` + params/ of values and scales), plus the source's tokenizer.model if it has one.

    The result loads (and serves) without the original weights. param_dtype: the dtype of what
    stays unquantized (embeddings, LM head, norms; default the checkpoint's).
    """
    import shutil
    from pathlib import Path

    from nemojax.checkpoint import PARAMS_DIR, load_model, save_model

    out = Path(out_dir)
    if (out / PARAMS_DIR).exists() and not overwrite:  # fail before reading any weights
        raise FileExistsError(f"{out / PARAMS_DIR} already exists; pass overwrite=True (CLI: --force) to replace it")
    if mode not in SERVING_MODES:
        raise ConfigError(f"quantization mode {mode!r}: choose one of {list(SERVING_MODES)}")
    model = load_model(ckpt, quantize=mode, quant_block_size=block_size, param_dtype=param_dtype,
                       compute_dtype=param_dtype, progress=progress)
    save_model(model, model.cfg, out, overwrite=overwrite)
    tok = Path(ckpt) / "tokenizer.model"
    if tok.is_file():
        shutil.copyfile(tok, out / "tokenizer.model")
    return out
