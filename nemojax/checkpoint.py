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
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from nemojax.config import Config, ConfigError, ModelConfig, save_config
from nemojax.convert.hf import CheckpointError, is_hf_dir

CONFIG_FILE = "config.yaml"
PARAMS_DIR = "params"
CHECKPOINTS_DIR = "checkpoints"
_CONFIG_SEARCH_DEPTH = 3  # step dir -> checkpoints/ -> run dir, plus one spare level

__all__ = ["CheckpointError", "save_model", "load_model", "load_params", "resolve_checkpoint",
           "read_model_config", "latest_step_dir"]


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

    model_or_params: a `NemotronLM`, its `nnx.State`, or the plain params dict.
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
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    from nemojax.model.transformer import abstract_model

    params_dir = Path(params_dir).absolute()
    abstract = nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param))
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    with ocp.StandardCheckpointer() as ckptr:
        try:
            stored = ckptr.metadata(params_dir)
        except (FileNotFoundError, ValueError) as e:
            raise FileNotFoundError(f"{params_dir} is not a readable orbax checkpoint ({e})") from None
        stored_tree = getattr(getattr(stored, "item_metadata", stored), "tree", None)
        stored_tree = stored_tree if stored_tree is not None else getattr(stored, "item_metadata", stored)
        wrapped = _is_value_wrapped(stored_tree)
        problems = []
        target: dict[str, Any] = {}
        for path, leaf in flat:
            keys = tuple(k.key for k in path)
            got = _lookup(stored_tree, keys + (("value",) if wrapped else ()))
            if got is None:
                problems.append(f"parameter {'.'.join(keys)} is missing")
            elif tuple(got.shape) != tuple(leaf.shape):
                problems.append(f"parameter {'.'.join(keys)} has shape {list(got.shape)}, the config says "
                                f"{list(leaf.shape)}")
            sds = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=_sharding_for(sharding, keys))
            node = target
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = {"value": sds} if wrapped else sds
        if problems:
            raise CheckpointError(f"checkpoint {params_dir} does not match its config.yaml:\n  "
                                  + "\n  ".join(problems))
        restored = ckptr.restore(params_dir, target)
    return _unwrap(restored) if wrapped else restored


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
               sharding: Any = None, progress: bool = True, **overrides: Any) -> Any:
    """A `NemotronLM` from any checkpoint kind (see `resolve_checkpoint`).

    param_dtype / compute_dtype: "float32" or "bfloat16" instead of the checkpoint's own.
    sharding: one `jax.sharding.Sharding` for all weights, a params-shaped dict of them, or
    None (first device). Other keyword arguments override ModelConfig fields that do not change
    shapes, e.g. attention_backend="dot_product" or scan_layers=False.
    """
    from flax import nnx

    from nemojax.model.transformer import abstract_model

    kind, where, cfg_path = resolve_checkpoint(path)
    if kind == "hf":
        from nemojax.convert.hf import load_hf_model

        return load_hf_model(where, param_dtype=param_dtype, compute_dtype=compute_dtype,
                             sharding=sharding, progress=progress, **overrides)
    cfg = read_model_config(cfg_path)
    cfg = with_overrides(cfg, {"param_dtype": param_dtype, "compute_dtype": compute_dtype, **overrides})
    params = load_params(where, cfg, sharding=sharding)
    graphdef, state = nnx.split(abstract_model(cfg))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)
