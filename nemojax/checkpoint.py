"""Model checkpoints: save a model's weights with its config, and load any checkpoint kind.

A *nemojax model checkpoint* is a directory holding

    config.yaml   the model section (or a whole run Config) -- enough to rebuild the module
    params/       an orbax PyTree checkpoint of the parameters as a plain nested dict,
                  {"embed": ..., "blocks": {"q": ..., ...}, "final_norm_scale": ..., ...}
                  (`nnx.to_pure_dict(nnx.state(model, nnx.Param))`)

Training runs use the same layout per step: `<run_dir>/config.yaml` and
`<run_dir>/checkpoints/<step>/params`, so `load_model` accepts a run directory (latest step),
a step directory, a model checkpoint, or a Hugging Face Nemotron directory (converted in
memory). Weights are restored straight into arrays of the abstract model's shapes and dtypes,
so a checkpoint is never held twice in memory, and a dtype override casts during the read.

The model section says which module the weights belong to: a reward model when
`model.reward.enabled` (`nemojax.model.reward`), LoRA adapters when `model.lora.rank > 0`
(`nemojax.model.lora`). `load_model` folds adapters into the weights unless asked not to, so
what it returns is always a plain model; `load_base_params` starts a post-training stage from
a checkpoint of a compatible base (an LM checkpoint for a reward model or an adapted model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any, Iterator

import yaml

from nemojax.config import Config, ConfigError, ModelConfig, save_config
from nemojax.convert.hf import CheckpointError, is_hf_dir

CONFIG_FILE = "config.yaml"
PARAMS_DIR = "params"
CHECKPOINTS_DIR = "checkpoints"
_CONFIG_SEARCH_DEPTH = 3  # step dir -> checkpoints/ -> run dir, plus one spare level

__all__ = ["CheckpointError", "save_model", "load_model", "load_params", "load_base_params",
           "resolve_checkpoint", "read_model_config", "latest_step_dir"]


def _params_tree(model_or_params: Any) -> Any:
    """A plain nested dict of arrays from a model, an nnx.State, or an already plain dict."""
    from flax import nnx

    if isinstance(model_or_params, nnx.Module):
        return nnx.to_pure_dict(nnx.state(model_or_params, nnx.Param))
    if isinstance(model_or_params, nnx.State):
        return nnx.to_pure_dict(model_or_params)
    return model_or_params


def save_model(model_or_params: Any, model_cfg: ModelConfig | Config, out_dir: str | Path, *,
               overwrite: bool = False) -> Path:
    """Write `out_dir/config.yaml` and `out_dir/params/` (orbax) and return `out_dir`.

    model_or_params: a `NemotronLM` / `NemotronRewardModel`, its `nnx.State`, or the plain params dict.
    model_cfg: the `ModelConfig` (written as `{model: ...}`) or a whole `Config`.
    Refuses to replace an existing params/ unless overwrite=True, because silently mixing a
    new config with old weights is the failure this layout exists to prevent.
    """
    import orbax.checkpoint as ocp

    out = Path(out_dir).absolute()
    params_dir = out / PARAMS_DIR
    if params_dir.exists() and not overwrite:
        raise FileExistsError(f"{params_dir} already exists; pass overwrite=True (CLI: --force) to replace it")
    out.mkdir(parents=True, exist_ok=True)
    tree = _params_tree(model_or_params)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(params_dir, tree, force=overwrite)
        ckptr.wait_until_finished()
    if isinstance(model_cfg, Config):
        save_config(model_cfg, out / CONFIG_FILE)
    else:
        (out / CONFIG_FILE).write_text(yaml.safe_dump({"model": dataclasses.asdict(model_cfg)}, sort_keys=False))
    return out


# --------------------------------------------------------------------------- locating


def latest_step_dir(checkpoints_dir: Path) -> Path | None:
    """The highest-numbered `<step>/` under a run's checkpoints/ that has a params/ dir.

    Only all-digit names count, so orbax's in-progress temporary directories are skipped.
    """
    steps = [p for p in checkpoints_dir.iterdir()
             if p.is_dir() and p.name.isdigit() and (p / PARAMS_DIR).is_dir()]
    return max(steps, key=lambda p: int(p.name)) if steps else None


def _find_config(start: Path) -> Path | None:
    node = start
    for _ in range(_CONFIG_SEARCH_DEPTH + 1):
        if (node / CONFIG_FILE).is_file():
            return node / CONFIG_FILE
        if node.parent == node:
            break
        node = node.parent
    return None


def resolve_checkpoint(path: str | Path) -> tuple[str, Path, Path]:
    """Classify `path`: ("hf", dir, dir/config.json) or ("nemojax", params_dir, config.yaml).

    Accepted, in order: a HF directory; a model checkpoint or step directory (has params/);
    a run directory (has checkpoints/<step>/params, the highest step wins); a params/
    directory itself. config.yaml is the nearest one at or above the params' parent.
    """
    p = Path(path).absolute()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path {p} does not exist")
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint path {p} is a file; pass the directory that holds "
                                f"config.yaml + {PARAMS_DIR}/ (or a Hugging Face config.json + *.safetensors)")
    if is_hf_dir(p):
        return "hf", p, p / "config.json"
    if (p / PARAMS_DIR).is_dir():
        params = p / PARAMS_DIR
    elif (p / CHECKPOINTS_DIR).is_dir():
        step = latest_step_dir(p / CHECKPOINTS_DIR)
        if step is None:
            raise FileNotFoundError(f"{p / CHECKPOINTS_DIR} has no <step>/{PARAMS_DIR} directory yet "
                                    f"(has the run saved a checkpoint?)")
        params = step / PARAMS_DIR
    elif p.name == PARAMS_DIR or (p / "_CHECKPOINT_METADATA").is_file():
        params = p
    else:
        hint = " (found config.json but no *.safetensors)" if (p / "config.json").is_file() else ""
        raise FileNotFoundError(
            f"{p} is not a checkpoint{hint}: expected {CONFIG_FILE} + {PARAMS_DIR}/ (nemojax), "
            f"{CHECKPOINTS_DIR}/<step>/{PARAMS_DIR} (training run), or config.json + model.safetensors "
            f"(Hugging Face)")
    cfg = _find_config(params.parent)
    if cfg is None:
        raise FileNotFoundError(f"no {CONFIG_FILE} found for {params} (looked in {params.parent} and "
                                f"{_CONFIG_SEARCH_DEPTH} levels above); it records the model shape "
                                f"needed to read the weights")
    return "nemojax", params, cfg


def read_model_config(config_path: str | Path) -> ModelConfig:
    """The model section of a checkpoint's config.yaml, validated.

    Only `model:` is read, so a run config whose data or mesh settings do not apply here
    (other paths, other devices) still loads.
    """
    from nemojax.config import _build  # the typed builder behind load_config, reused for one section

    path = Path(config_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise ConfigError(f"{path} has no 'model:' section; a checkpoint's config must describe the model")
    cfg = _build(ModelConfig, raw["model"], "model")
    cfg.validate("model")
    return cfg


# --------------------------------------------------------------------------- loading


def with_overrides(cfg: ModelConfig, overrides: dict[str, Any]) -> ModelConfig:
    """`cfg` with the given ModelConfig fields replaced (None values ignored), validated."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"unknown model setting(s) {unknown}; valid: {sorted(names)}")
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    cfg.validate("model")
    return cfg


def _sharding_for(sharding: Any, path: tuple[str, ...]) -> Any:
    import jax

    node = sharding
    if isinstance(sharding, dict):
        for k in path:
            node = node[k]
    return node if node is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])


def load_params(params_dir: str | Path, cfg: ModelConfig, *, sharding: Any = None) -> dict[str, Any]:
    """Restore a params/ orbax checkpoint into arrays shaped and typed by `cfg`.

    The target is built from the abstract model, so orbax allocates each array once, in
    cfg.param_dtype (casting if the checkpoint was saved in another dtype). Checkpoints of an
    `nnx.State` saved as is (leaves wrapped as {"value": array}) are read too.
    """
    params, _ = _restore(Path(params_dir).absolute(), cfg, sharding=sharding, optional=lambda keys: False,
                         what="its config.yaml")
    return params


def _abstract_params(cfg: ModelConfig) -> dict[str, Any]:
    from flax import nnx

    from nemojax.model.reward import make_abstract_model

    return nnx.to_pure_dict(nnx.state(make_abstract_model(cfg), nnx.Param))


class _NoItemMetadataWarning(logging.Filter):
    """Drops orbax's "Metadata file does not exist" for the `params` item of a training step: the
    CheckpointManager writes that file once per step directory, not per item, so reading the item
    alone (every `load_model` of a run) would warn about a file that was never meant to be there."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Metadata file does not exist")


@contextlib.contextmanager
def _quiet_item_metadata():
    log, quiet = logging.getLogger("absl"), _NoItemMetadataWarning()
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)


def _restore(params_dir: Path, cfg: ModelConfig, *, sharding: Any, optional: Any, what: str,
             ) -> tuple[dict[str, Any], list[str]]:
    with _quiet_item_metadata():
        return _restore_params(params_dir, cfg, sharding=sharding, optional=optional, what=what)


def _restore_params(params_dir: Path, cfg: ModelConfig, *, sharding: Any, optional: Any, what: str,
                    ) -> tuple[dict[str, Any], list[str]]:
    """Read the params of `cfg`'s model from `params_dir`; (params, names of optional ones absent).

    optional(keys) says whether a parameter may be absent from the checkpoint; a stored
    parameter the model does not have is an error unless some parameter is optional (then the
    read is partial, as when a reward model starts from a language model's checkpoint).
    """
    import orbax.checkpoint as ocp

    target, wrapped, partial, absent = _plan_restore(params_dir, cfg, sharding=sharding, optional=optional, what=what)
    if partial:
        restored = _partial_restore(params_dir, target)
    else:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(params_dir, target)
    return (_unwrap(restored) if wrapped else restored), absent


def _partial_restore(params_dir: Path, target: dict[str, Any]) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    ckptr = ocp.PyTreeCheckpointer()
    return ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))


def iter_params(params_dir: str | Path, cfg: ModelConfig, *, sharding: Any = None, optional: Any = None,
                ) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Yield (params-tree path, array) of a params/ checkpoint of `cfg`'s model, one array at a time.

    Checked against `cfg` like `load_params` before anything is read (parameters for which
    `optional(keys)` is true may be absent and are then skipped); each array is read alone, so
    a caller that transforms and drops each one (quantization at load) never holds the
    checkpoint's full-precision weights at once.
    """
    import jax

    params_dir = Path(params_dir).absolute()
    with _quiet_item_metadata():
        target, wrapped, _, _ = _plan_restore(params_dir, cfg, sharding=sharding,
                                              optional=optional or (lambda keys: False), what="its config.yaml")
        for path, _ in jax.tree_util.tree_flatten_with_path(_abstract_params(cfg))[0]:
            keys = tuple(k.key for k in path)
            leaf = _lookup(target, keys)
            if leaf is None:  # an optional parameter the checkpoint does not have
                continue
            one: dict[str, Any] = {}
            node = one
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = leaf
            got = _lookup(_partial_restore(params_dir, one), keys + (("value",) if wrapped else ()))
            yield keys, got


def _plan_restore(params_dir: Path, cfg: ModelConfig, *, sharding: Any, optional: Any, what: str,
                  ) -> tuple[dict[str, Any], bool, bool, list[str]]:
    """(restore target, leaves wrapped as {"value": ...}, partial read, absent optional names) after
    checking the stored tree against `cfg`'s parameters (CheckpointError naming each problem)."""
    import jax
    import orbax.checkpoint as ocp

    flat = jax.tree_util.tree_flatten_with_path(_abstract_params(cfg))[0]
    with ocp.StandardCheckpointer() as ckptr:
        try:
            stored = ckptr.metadata(params_dir)
        except (FileNotFoundError, ValueError) as e:
            raise FileNotFoundError(f"{params_dir} is not a readable orbax checkpoint ({e})") from None
    stored_tree = getattr(getattr(stored, "item_metadata", stored), "tree", None)
    stored_tree = stored_tree if stored_tree is not None else getattr(stored, "item_metadata", stored)
    wrapped = _is_value_wrapped(stored_tree)
    problems, absent = [], []
    target: dict[str, Any] = {}
    wanted = set()
    for path, leaf in flat:
        keys = tuple(k.key for k in path)
        wanted.add(keys)
        got = _lookup(stored_tree, keys + (("value",) if wrapped else ()))
        if got is None:
            if optional(keys):
                absent.append(".".join(keys))
                continue
            problems.append(f"parameter {'.'.join(keys)} is missing")
        elif tuple(got.shape) != tuple(leaf.shape):
            problems.append(f"parameter {'.'.join(keys)} has shape {list(got.shape)}, the config says "
                            f"{list(leaf.shape)}")
        sds = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=_sharding_for(sharding, keys))
        node = target
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = {"value": sds} if wrapped else sds
    extra = sorted(".".join(k) for k in _leaf_keys(stored_tree, wrapped) if k not in wanted)
    partial = bool(extra) and any(optional(k) for k in wanted)
    if extra and not partial:
        problems.append(f"the checkpoint holds parameter(s) the config does not describe: {', '.join(extra[:8])}"
                        + (" ..." if len(extra) > 8 else "")
                        + " (a reward or LoRA checkpoint read with a plain model config?)")
    if problems:
        raise CheckpointError(f"checkpoint {params_dir} does not match {what}:\n  " + "\n  ".join(problems))
    return target, wrapped, partial, absent


def _leaf_keys(tree: Any, wrapped: bool, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(tree, dict) and not (wrapped and set(tree) == {"value"}):
        return [k for name, sub in tree.items() for k in _leaf_keys(sub, wrapped, prefix + (name,))]
    return [prefix]


def _lookup(tree: Any, keys: tuple[str, ...]) -> Any:
    node = tree
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            return None
        node = node[k]
    return node


def _is_value_wrapped(tree: Any) -> bool:
    embed = tree.get("embed") if isinstance(tree, dict) else None
    return isinstance(embed, dict) and set(embed) == {"value"}


def _unwrap(tree: Any) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {"value"} and not isinstance(tree["value"], dict):
            return tree["value"]
        return {k: _unwrap(v) for k, v in tree.items()}
    return tree


def load_model(path: str | Path, *, param_dtype: str | None = None, compute_dtype: str | None = None,
               sharding: Any = None, progress: bool = True, merge_lora: bool = True, quantize: str | None = None,
               quant_block_size: int = 0, **overrides: Any) -> Any:
    """The model of any checkpoint kind (see `resolve_checkpoint`).

    A `NemotronLM` (`model(ids)` -> logits), or a `NemotronRewardModel` (`model(ids)` ->
    attribute scores) for a reward checkpoint. LoRA adapters are folded into the weights
    (`merge_lora=False` keeps them, e.g. to continue training them).
    param_dtype / compute_dtype: "float32" or "bfloat16" instead of the checkpoint's own.
    quantize: "int8" / "fp8" (/ "nf4") quantizes the block projections while reading, one
    parameter at a time (nemojax.convert.quantize; `quant_block_size` input elements per scale,
    0 = per output channel). A quantized checkpoint loads quantized without it.
    sharding: one `jax.sharding.Sharding` for all weights, a params-shaped dict of them, or
    None (first device). Other keyword arguments override ModelConfig fields that do not change
    shapes, e.g. attention_backend="dot_product" or scan_layers=False.
    """
    from nemojax.convert.quantize import build, quant_target, quantize_model, quantize_stream
    from nemojax.model.lora import merge_lora as fold_adapters

    kind, where, cfg_path = resolve_checkpoint(path)
    if kind == "hf":
        from nemojax.convert.hf import load_hf_model

        return load_hf_model(where, param_dtype=param_dtype, compute_dtype=compute_dtype, sharding=sharding,
                             progress=progress, quantize=quantize, quant_block_size=quant_block_size, **overrides)
    cfg = read_model_config(cfg_path)
    cfg = with_overrides(cfg, {"param_dtype": param_dtype, "compute_dtype": compute_dtype, **overrides})
    target = quant_target(cfg, quantize, quant_block_size, where=str(path))
    if target is not None and cfg.lora.rank:  # adapters merge into full-precision weights first
        if not merge_lora:
            raise ConfigError(f"{path} has LoRA adapters: quantizing at load merges them (merge_lora=True)")
        model = fold_adapters(build(cfg, load_params(where, cfg, sharding=sharding)))
        return quantize_model(model, target.mode, target.block_size, sharding=sharding)
    if target is not None:
        qcfg = dataclasses.replace(cfg, quant=target)
        return build(qcfg, quantize_stream(iter_params(where, cfg, sharding=sharding), target, sharding))
    model = build(cfg, load_params(where, cfg, sharding=sharding))
    return fold_adapters(model) if merge_lora else model


def _is_new_in_post_training(keys: tuple[str, ...]) -> bool:
    """Parameters a base checkpoint may lack: the reward head and LoRA adapters."""
    from nemojax.model.lora import SUFFIX_A, SUFFIX_B

    return keys[0] == "reward_head" or keys[-1].endswith((SUFFIX_A, SUFFIX_B))


def load_base_params(path: str | Path, cfg: ModelConfig, *, sharding: Any = None,
                     progress: bool = True) -> tuple[dict[str, Any], list[str]]:
    """Initial weights for a model shaped by `cfg`, read from a compatible base checkpoint.

    How a post-training stage starts from `init_from=`: a reward model or an adapted model from
    a language-model checkpoint (nemojax or Hugging Face), or any stage from a previous one.
    Every parameter the source has is read into `cfg`'s shapes and dtypes (a source's own LoRA
    adapters are folded in first, so the next round starts from the merged result); the
    reward head and adapters may be absent. Returns (params, dotted names of the absent ones),
    which the caller initialises (e.g. from `make_model(cfg)`). Shape mismatches and any other
    absent parameter raise CheckpointError naming them.
    """
    if cfg.quant.enabled:
        return _load_quantized_base(path, cfg, sharding=sharding, progress=progress)
    kind, where, cfg_path = resolve_checkpoint(path)
    if kind == "nemojax":
        src_cfg = read_model_config(cfg_path)
        if not src_cfg.lora.rank:
            return _restore(where, cfg, sharding=sharding, optional=_is_new_in_post_training,
                            what=f"the model being initialised from it ({path})")
        source = _params_tree(load_model(path, merge_lora=True))
    else:
        source = {}
        for keys, arr in _hf_full_precision(where, progress):
            node = source
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = arr
    return _pick(source, cfg, sharding, str(path))


def _hf_full_precision(where: Path, progress: bool) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path, array) of a Hugging Face directory's parameters one at a time, an FP8 export's
    projections dequantized to its param_dtype (a base for another model is read in full precision)."""
    import numpy as np

    from nemojax.convert.hf import hf_config_and_tied, iter_hf_params
    from nemojax.model import quant
    from nemojax.model.transformer import DTYPES

    src_cfg, tied = hf_config_and_tied(where)
    scales: dict[str, Any] = {}
    for keys, arr in iter_hf_params(where, src_cfg, tied=tied, progress=progress):
        if keys[-1].endswith(quant.SCALE_SUFFIX):  # comes right before its values
            scales[keys[-1][:-len(quant.SCALE_SUFFIX)]] = arr
            continue
        if keys[0] == "blocks" and keys[-1] in scales:
            arr = np.asarray(quant.dequantize(quant.QArray(arr, scales.pop(keys[-1])), DTYPES[src_cfg.param_dtype]))
        yield keys, arr


def _load_quantized_base(path: str | Path, cfg: ModelConfig, *, sharding: Any, progress: bool,
                         ) -> tuple[dict[str, Any], list[str]]:
    """`load_base_params` for a quantized model (QLoRA, `model.quant`): the base is read one
    parameter at a time in `param_dtype` and its projections quantized as they arrive, so the
    full-precision base is never held at once; a base already quantized the same way is read as is."""
    import jax
    import jax.numpy as jnp

    from nemojax.config import QuantConfig
    from nemojax.convert.quantize import quantize_stream

    base_cfg = dataclasses.replace(cfg, quant=QuantConfig())
    kind, where, cfg_path = resolve_checkpoint(path)
    if kind == "nemojax":
        src_cfg = read_model_config(cfg_path)
        if src_cfg.quant.enabled and not src_cfg.lora.rank:
            if src_cfg.quant != cfg.quant:
                raise CheckpointError(f"{path} is quantized as {src_cfg.quant.mode} (block_size "
                                      f"{src_cfg.quant.block_size}) but this model needs {cfg.quant.mode} (block_size "
                                      f"{cfg.quant.block_size}); start from the full-precision checkpoint")
            return _restore(where, cfg, sharding=sharding, optional=_is_new_in_post_training,
                            what=f"the model being initialised from it ({path})")
        if not src_cfg.lora.rank:
            items: Any = iter_params(where, base_cfg, sharding=sharding, optional=_is_new_in_post_training)
        else:  # adapters are merged into (dequantized) full-precision weights first
            merged = _params_tree(load_model(path, merge_lora=True))
            items = ((tuple(k.key for k in p), x) for p, x in jax.tree_util.tree_flatten_with_path(merged)[0])
    else:
        items = _hf_full_precision(where, progress)
    expected = {tuple(k.key for k in p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(
        _abstract_params(base_cfg))[0]}
    seen: set[tuple[str, ...]] = set()
    problems: list[str] = []

    def checked() -> Iterator[tuple[tuple[str, ...], Any]]:
        for keys, arr in items:
            leaf = expected.get(keys)
            if leaf is None:  # e.g. an LM head when initialising a reward model
                continue
            if tuple(arr.shape) != tuple(leaf.shape):
                problems.append(f"{'.'.join(keys)} has shape {list(arr.shape)}, the model needs {list(leaf.shape)}")
                continue
            seen.add(keys)
            yield keys, jnp.asarray(arr, leaf.dtype)

    params = quantize_stream(checked(), cfg.quant, sharding)
    absent = [k for k in expected if k not in seen]
    problems += [".".join(k) for k in absent if not _is_new_in_post_training(k)]
    if problems:
        raise CheckpointError(f"{path} cannot initialise this model: " + "; ".join(problems[:8]))
    return params, [".".join(k) for k in absent]


def _pick(source: dict[str, Any], cfg: ModelConfig, sharding: Any, where: str) -> tuple[dict[str, Any], list[str]]:
    """The parameters of `cfg`'s model taken from an in-memory source tree, placed and cast."""
    import jax

    flat = jax.tree_util.tree_flatten_with_path(_abstract_params(cfg))[0]
    out: dict[str, Any] = {}
    absent, problems = [], []
    for path, leaf in flat:
        keys = tuple(k.key for k in path)
        got = _lookup(source, keys)
        if got is None:
            (absent if _is_new_in_post_training(keys) else problems).append(".".join(keys))
            continue
        if tuple(got.shape) != tuple(leaf.shape):
            problems.append(f"{'.'.join(keys)} has shape {list(got.shape)}, the model needs {list(leaf.shape)}")
            continue
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = jax.device_put(jax.numpy.asarray(got, leaf.dtype), _sharding_for(sharding, keys))
    if problems:
        raise CheckpointError(f"{where} cannot initialise this model: " + "; ".join(problems[:8]))
    return out, absent
