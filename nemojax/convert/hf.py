"""Hugging Face `transformers` Nemotron <-> nemojax, one tensor at a time.

Why streaming: a Nemotron-4 checkpoint can be most of a host's memory, so conversion never
builds a second full copy. Reading fills one preallocated stacked buffer per nemojax
parameter (the `layers` axis is filled layer by layer from `model.layers.{i}.*` tensors) and
hands it on before the next is allocated. Writing walks the HF tensor list, producing and
writing each tensor's bytes straight into the `.safetensors` file(s), so only one tensor's
HF-layout copy exists at a time.

Layout facts (see ../shared/NEMOTRON_FACTS.md): HF linear weights are [out, in]; nemojax keeps
[in, out] with heads split out, e.g. `q_proj` [H*hd, D] <-> `blocks.q[i]` [D, H, hd] and
`o_proj` [D, H*hd] <-> `blocks.o[i]` [H, hd, D]. LayerNorm1P weights are zero-centred in both
(effective gamma = 1 + w), so they are copied unchanged.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from nemojax.config import ConfigError, ModelConfig

HF_MODEL_TYPE = "nemotron"
HF_ARCHITECTURE = "NemotronForCausalLM"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_MAX_SHARD_SIZE = "5GB"

# HF tensors that carry no weights (old checkpoints stored RoPE tables as buffers).
_IGNORED_HF_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")


class CheckpointError(ValueError):
    """A checkpoint's contents do not match what its config promises; the message names the tensor."""


# --------------------------------------------------------------------------- configs


def _dtype_name(hf: dict[str, Any]) -> str | None:
    name = hf.get("dtype") or hf.get("torch_dtype")
    if name is None:
        return None
    return str(name).removeprefix("torch.")


def hf_config_to_model_config(hf: dict[str, Any], *, param_dtype: str | None = None,
                              compute_dtype: str | None = None) -> ModelConfig:
    """A `ModelConfig` from a Nemotron `config.json` dict; refuse anything nemojax cannot compute.

    Every rejection names the config.json field, because the usual cause is pointing the
    converter at a different architecture (a Llama or Mistral directory) by mistake.
    param_dtype defaults to the checkpoint's dtype (float16 is widened to float32, which is
    exact; nemojax computes in float32 or bfloat16 only); compute_dtype follows param_dtype.
    """
    if not isinstance(hf, dict):
        raise ConfigError(f"config.json must hold a JSON object, got {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type != HF_MODEL_TYPE:
        raise ConfigError(
            f"config.json field 'model_type' is {model_type!r}; nemojax converts only Nemotron "
            f"checkpoints (model_type {HF_MODEL_TYPE!r}, architectures [{HF_ARCHITECTURE!r}])")
    archs = hf.get("architectures")
    if archs is not None and HF_ARCHITECTURE not in archs:
        raise ConfigError(
            f"config.json field 'architectures' is {archs!r}; nemojax converts only "
            f"{HF_ARCHITECTURE} (a causal LM with an lm_head), not task-head variants")
    act = hf.get("hidden_act", "relu2")
    if act != "relu2":
        raise ConfigError(f"config.json field 'hidden_act' is {act!r}; the Nemotron-4 MLP nemojax "
                          f"implements is squared ReLU ('relu2')")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ConfigError(f"config.json field {flag!r} is true; nemojax's Nemotron has no "
                              f"biases in linear layers")

    def need(key: str) -> Any:
        if hf.get(key) is None:
            raise ConfigError(f"config.json is missing the required field {key!r}")
        return hf[key]

    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    head_dim = hf.get("head_dim")
    head_dim = hidden // heads if head_dim is None else int(head_dim)
    kv_heads = hf.get("num_key_value_heads")
    kv_heads = heads if kv_heads is None else int(kv_heads)

    # transformers >= 5 nests RoPE settings in rope_parameters; older files kept them top-level
    # (and older still called the fraction rope_percent).
    rope = hf.get("rope_parameters")
    if rope is not None and not isinstance(rope, dict):
        raise ConfigError(f"config.json field 'rope_parameters' must be an object, got {rope!r}")
    rope = dict(rope or {})
    legacy_scaling = hf.get("rope_scaling")
    if legacy_scaling and legacy_scaling.get("rope_type", legacy_scaling.get("type")) not in (None, "default"):
        raise ConfigError(f"config.json field 'rope_scaling' is {legacy_scaling!r}; nemojax implements "
                          f"plain RoPE only")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"config.json field 'rope_parameters.rope_type' is {rope_type!r}; nemojax "
                          f"implements plain ('default') RoPE only")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    fraction = rope.get("partial_rotary_factor",
                        hf.get("partial_rotary_factor", hf.get("rope_percent", 0.5)))

    if param_dtype is None:
        name = _dtype_name(hf) or "float32"
        param_dtype = "bfloat16" if name == "bfloat16" else "float32"
    if compute_dtype is None:
        compute_dtype = param_dtype
    eos = hf.get("eos_token_id", 3)
    if isinstance(eos, list):
        eos = eos[0] if eos else 3
    defaults = ModelConfig()
    cfg = ModelConfig(
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        num_layers=int(need("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        ffn_hidden_size=int(need("intermediate_size")),
        rotary_percentage=float(fraction),
        rope_base=float(theta),
        norm_eps=float(hf.get("norm_eps", defaults.norm_eps)),
        init_std=float(hf.get("initializer_range", defaults.init_std)),
        max_seq_len=int(hf.get("max_position_embeddings", defaults.max_seq_len)),
        param_dtype=param_dtype,
        compute_dtype=compute_dtype,
        bos_id=int(hf["bos_token_id"]) if hf.get("bos_token_id") is not None else defaults.bos_id,
        eos_id=int(eos) if eos is not None else defaults.eos_id,
        pad_id=int(hf["pad_token_id"]) if hf.get("pad_token_id") is not None else defaults.pad_id,
    )
    if hf.get("quantization_config") is not None:  # an FP8 export (nemojax.convert.compressed_tensors)
        from nemojax.config import QuantConfig
        from nemojax.convert.compressed_tensors import quant_from_hf_config

        cfg.quant = QuantConfig(mode=quant_from_hf_config(hf["quantization_config"]))
    cfg.validate("model (from config.json)")
    return cfg


def model_config_to_hf_config(cfg: ModelConfig, dtype: str | None = None) -> dict[str, Any]:
    """The config.json dict `transformers.NemotronForCausalLM.from_pretrained` reads.

    RoPE settings go both into `rope_parameters` (transformers >= 5) and top-level
    (`rope_theta`, `partial_rotary_factor`) so older transformers read the same model.
    """
    return {
        "architectures": [HF_ARCHITECTURE],
        "model_type": HF_MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "relu2",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base,
                            "partial_rotary_factor": cfg.rotary_percentage},
        "rope_theta": cfg.rope_base,
        "partial_rotary_factor": cfg.rotary_percentage,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": cfg.bos_id,
        "eos_token_id": cfg.eos_id,
        "pad_token_id": cfg.pad_id,
        "use_cache": True,
        "dtype": dtype or cfg.param_dtype,
    }


# --------------------------------------------------------------------------- tensor map


@dataclass(frozen=True)
class TensorMap:
    """How one nemojax parameter corresponds to HF tensor(s).

    `n_in` is None for tensors copied unchanged (embeddings, norms); otherwise the nemojax
    array (one layer's slice) is [in dims..., out dims...] with `n_in` leading input dims,
    and the HF tensor is the 2-D transpose [prod(out), prod(in)].
    """

    path: tuple[str, ...]  # key path in the nemojax params tree
    hf_name: str  # contains "{i}" for per-layer tensors
    n_in: int | None

    @property
    def layered(self) -> bool:
        return "{i}" in self.hf_name

    def hf_shape(self, ours: tuple[int, ...]) -> tuple[int, ...]:
        if self.n_in is None:
            return ours
        return (math.prod(ours[self.n_in:]), math.prod(ours[:self.n_in]))

    def to_ours(self, hf: np.ndarray, ours: tuple[int, ...]) -> np.ndarray:
        return hf if self.n_in is None else hf.T.reshape(ours)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        if self.n_in is None:
            return ours
        return ours.reshape(math.prod(ours.shape[:self.n_in]), -1).T


TENSOR_MAPS: tuple[TensorMap, ...] = (
    TensorMap(("embed",), "model.embed_tokens.weight", None),
    TensorMap(("blocks", "attn_norm_scale"), "model.layers.{i}.input_layernorm.weight", None),
    TensorMap(("blocks", "attn_norm_bias"), "model.layers.{i}.input_layernorm.bias", None),
    TensorMap(("blocks", "q"), "model.layers.{i}.self_attn.q_proj.weight", 1),
    TensorMap(("blocks", "k"), "model.layers.{i}.self_attn.k_proj.weight", 1),
    TensorMap(("blocks", "v"), "model.layers.{i}.self_attn.v_proj.weight", 1),
    TensorMap(("blocks", "o"), "model.layers.{i}.self_attn.o_proj.weight", 2),
    TensorMap(("blocks", "mlp_norm_scale"), "model.layers.{i}.post_attention_layernorm.weight", None),
    TensorMap(("blocks", "mlp_norm_bias"), "model.layers.{i}.post_attention_layernorm.bias", None),
    TensorMap(("blocks", "up"), "model.layers.{i}.mlp.up_proj.weight", 1),
    TensorMap(("blocks", "down"), "model.layers.{i}.mlp.down_proj.weight", 1),
    TensorMap(("final_norm_scale",), "model.norm.weight", None),
    TensorMap(("final_norm_bias",), "model.norm.bias", None),
    TensorMap(("lm_head",), "lm_head.weight", 1),
)


_SHAPES: dict[str, dict[tuple[str, ...], tuple[int, ...]]] = {}


def param_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Shape of every nemojax parameter (layered ones include the leading layers axis).

    Memoized per config: building the abstract model traces its initializer (a noticeable part
    of a small model's load time), and one load asks several times."""
    key = repr(cfg)
    if key not in _SHAPES:
        _SHAPES[key] = _param_shapes(cfg)
    return dict(_SHAPES[key])


def _param_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    from nemojax.model.transformer import abstract_model

    import jax
    from flax import nnx

    tree = nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param))
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def _np_dtype(name: str) -> np.dtype:
    import ml_dtypes

    table = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
    if name not in table:
        raise ConfigError(f"dtype {name!r} is not supported; choose float32, bfloat16 or float16")
    return np.dtype(table[name])


# --------------------------------------------------------------------------- reading


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a Hugging Face model directory needs config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


def is_hf_dir(path: str | Path) -> bool:
    """True when `path` looks like a Hugging Face model directory (config.json + safetensors)."""
    p = Path(path)
    return (p / "config.json").is_file() and (
        (p / INDEX_FILE).is_file() or any(p.glob("*.safetensors")))


class SafetensorsReader:
    """Lazy, read-only view over a single-file or sharded (indexed) safetensors checkpoint.

    Files are opened with `safetensors.safe_open` (memory-mapped); nothing is read until
    `get` asks for one tensor. Use as a context manager so the handles close.
    """

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        self._stack = contextlib.ExitStack()
        self._handles: dict[str, Any] = {}
        self.weight_map: dict[str, str] = {}
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                self.weight_map = dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index ({e!r})") from None
            for fname in sorted(set(self.weight_map.values())):
                if not (self.dir / fname).is_file():
                    raise FileNotFoundError(f"{self.dir / fname} not found, but {index} lists it as "
                                            f"holding tensors such as "
                                            f"{next(k for k, v in self.weight_map.items() if v == fname)!r}")
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not files:
                other = sorted(p.name for p in self.dir.glob("*.bin")) + sorted(p.name for p in self.dir.glob("*.pt"))
                hint = (f"; found {other[:3]} (PyTorch pickles are not read: re-save with "
                        f"save_pretrained(..., safe_serialization=True))") if other else ""
                raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.dir}{hint}")
            for fname in files:
                for name in self._open(fname).keys():
                    self.weight_map[name] = fname

    def _open(self, fname: str) -> Any:
        if fname not in self._handles:
            from safetensors import safe_open

            # framework="flax": numpy cannot represent bfloat16, jax (ml_dtypes) can.
            self._handles[fname] = self._stack.enter_context(
                safe_open(str(self.dir / fname), framework="flax"))
        return self._handles[fname]

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def names(self) -> list[str]:
        return list(self.weight_map)

    def file_of(self, name: str) -> Path:
        return self.dir / self.weight_map[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self.weight_map[name]).get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        import jax

        handle = self._open(self.weight_map[name])
        if handle.get_slice(name).get_dtype() == "F8_E4M3":  # safetensors' numpy/flax readers have no fp8
            return self._get_fp8(name)
        with jax.default_device(jax.devices("cpu")[0]):  # never stage weights on an accelerator
            return np.asarray(handle.get_tensor(name))

    def _get_fp8(self, name: str) -> np.ndarray:
        """An F8_E4M3 tensor read from its byte range (header: 8-byte length, JSON, then the data)."""
        import ml_dtypes

        path = self.file_of(name)
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            entry = json.loads(f.read(n))[name]
            start, end = entry["data_offsets"]
            f.seek(8 + n + start)
            data = f.read(end - start)
        return np.frombuffer(data, dtype=ml_dtypes.float8_e4m3fn).reshape(entry["shape"])


def _expected_hf_tensors(cfg: ModelConfig) -> list[tuple[TensorMap, int | None, str, tuple[int, ...]]]:
    """(map, layer, HF name, HF shape) for every tensor a Nemotron checkpoint of `cfg` holds
    (a quantized cfg's projections also have a `weight_scale`: `_scale_tensors`)."""
    shapes = param_shapes(cfg)
    out = []
    for tm in TENSOR_MAPS:
        ours = shapes[tm.path]
        if tm.layered:
            for i in range(cfg.num_layers):
                out.append((tm, i, tm.hf_name.format(i=i), tm.hf_shape(ours[1:])))
        else:
            out.append((tm, None, tm.hf_name, tm.hf_shape(ours)))
    return out


def _is_quantized(cfg: ModelConfig, tm: TensorMap) -> bool:
    from nemojax.model.quant import QUANT_TARGETS

    return cfg.quant.enabled and tm.path[0] == "blocks" and tm.path[1] in QUANT_TARGETS


def _scale_tensors(cfg: ModelConfig) -> list[tuple[TensorMap, int, str, tuple[int, ...]]]:
    """(map, layer, HF name, HF shape [out, groups]) of every weight_scale of a quantized cfg."""
    from nemojax.model.quant import scale_name

    shapes = param_shapes(cfg)
    out = []
    for tm, layer, name, shape in _expected_hf_tensors(cfg):
        if _is_quantized(cfg, tm):
            groups = math.prod(shapes[("blocks", scale_name(tm.path[1]))][1:1 + tm.n_in])
            out.append((tm, layer, name + "_scale", (shape[0], groups)))
    return out


def check_hf_tensors(reader: SafetensorsReader, cfg: ModelConfig, *, tied: bool = False) -> None:
    """Compare every tensor's presence and shape with `cfg` before any weight is read.

    Checking first means a wrong checkpoint fails in seconds, not after loading 300 GB.
    """
    problems = []
    expected = _expected_hf_tensors(cfg) + _scale_tensors(cfg)
    names = set(reader.names())
    for _, _, name, shape in expected:
        if name not in names:
            if name == "lm_head.weight" and tied:
                continue
            problems.append(f"tensor {name!r} is missing (expected shape {list(shape)})")
        elif reader.shape(name) != shape:
            problems.append(f"tensor {name!r} in {reader.file_of(name).name} has shape "
                            f"{list(reader.shape(name))}, expected {list(shape)} from config.json")
    known = {name for _, _, name, _ in expected}
    for name in sorted(names - known):
        if not _IGNORED_HF_TENSORS.match(name):
            problems.append(f"unexpected tensor {name!r} in {reader.file_of(name).name}: nemojax's "
                            f"Nemotron has no parameter for it")
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise CheckpointError(f"Hugging Face checkpoint {reader.dir} does not match its config.json:\n  "
                              + "\n  ".join(problems[:10]) + more)


def iter_hf_params(hf_dir: str | Path, cfg: ModelConfig, *, tied: bool = False,
                   progress: bool = True) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """Yield (params-tree path, numpy array in nemojax layout and cfg.param_dtype), one at a time
    (an FP8 export's projections: float8 values, each preceded by its stacked fp32 scale).

    Each stacked parameter is one preallocated buffer filled layer by layer; the caller should
    drop (or hand to the device) each array before asking for the next, so peak host memory
    is the converted model plus one parameter.
    """
    from tqdm.auto import tqdm

    import ml_dtypes

    dtype = _np_dtype(cfg.param_dtype)
    shapes = param_shapes(cfg)
    with SafetensorsReader(hf_dir) as reader:
        check_hf_tensors(reader, cfg, tied=tied)
        total = sum(cfg.num_layers if tm.layered else 1 for tm in TENSOR_MAPS)
        bar = tqdm(total=total, desc=f"reading {Path(hf_dir).name}", unit="tensor", disable=not progress)
        for tm in TENSOR_MAPS:
            shape = shapes[tm.path]
            quantized = _is_quantized(cfg, tm)
            buf = np.empty(shape, ml_dtypes.float8_e4m3fn if quantized else dtype)
            if quantized:  # an FP8 export: the scales first, one stacked parameter like the values
                yield _read_scales(reader, cfg, tm, shapes)
            if tm.layered:
                for i in range(cfg.num_layers):
                    buf[i] = tm.to_ours(reader.get(tm.hf_name.format(i=i)), shape[1:])
                    bar.update()
            else:
                name = tm.hf_name
                if name == "lm_head.weight" and name not in reader.weight_map:  # tied embeddings
                    buf[...] = reader.get("model.embed_tokens.weight").T
                else:
                    buf[...] = tm.to_ours(reader.get(name), shape)
                bar.update()
            yield tm.path, buf
            del buf
        bar.close()


def _read_scales(reader: SafetensorsReader, cfg: ModelConfig, tm: TensorMap,
                 shapes: dict[tuple[str, ...], tuple[int, ...]]) -> tuple[tuple[str, ...], np.ndarray]:
    """The stacked nemojax scale of projection `tm` from its per-layer `weight_scale` tensors."""
    from nemojax.model.quant import scale_name

    path = ("blocks", scale_name(tm.path[1]))
    buf = np.empty(shapes[path], np.float32)
    for i in range(cfg.num_layers):
        hf = np.asarray(reader.get(tm.hf_name.format(i=i) + "_scale"), np.float32)
        buf[i] = hf.T.reshape(shapes[path][1:])
    return path, buf


def load_hf_params(hf_dir: str | Path, cfg: ModelConfig, *, tied: bool = False, sharding: Any = None,
                   progress: bool = True) -> dict[str, Any]:
    """The nemojax params pure-dict (jax arrays) of a HF Nemotron directory, streamed.

    sharding: one `jax.sharding.Sharding` for every array, a params-shaped tree of them, or
    None for the first device.
    """
    import jax

    tree: dict[str, Any] = {}
    for path, arr in iter_hf_params(hf_dir, cfg, tied=tied, progress=progress):
        target = sharding
        if isinstance(sharding, dict):
            for k in path:
                target = target[k]
        if target is None:
            target = jax.devices()[0]
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = jax.device_put(arr, target)
        del arr
    return tree


def hf_config_and_tied(hf_dir: str | Path, **dtypes: str | None) -> tuple[ModelConfig, bool]:
    hf = read_hf_config(hf_dir)
    return hf_config_to_model_config(hf, **dtypes), bool(hf.get("tie_word_embeddings", False))


def load_hf_model(hf_dir: str | Path, *, param_dtype: str | None = None, compute_dtype: str | None = None,
                  sharding: Any = None, progress: bool = True, quantize: str | None = None,
                  quant_block_size: int = 0, **overrides: Any) -> Any:
    """A `NemotronLM` built directly from a HF Nemotron directory (converted in memory); with
    `quantize`, its projections quantized tensor by tensor as they are read (nemojax.convert.quantize)."""
    import dataclasses

    from nemojax.checkpoint import with_overrides
    from nemojax.convert.quantize import build, quant_target, quantize_stream

    cfg, tied = hf_config_and_tied(hf_dir, param_dtype=param_dtype, compute_dtype=compute_dtype)
    cfg = with_overrides(cfg, overrides)
    target = quant_target(cfg, quantize, quant_block_size, where=str(hf_dir))
    if target is not None:
        items = iter_hf_params(hf_dir, cfg, tied=tied, progress=progress)
        return build(dataclasses.replace(cfg, quant=target), quantize_stream(items, target, sharding))
    return build(cfg, load_hf_params(hf_dir, cfg, tied=tied, sharding=sharding, progress=progress))


def convert_from_hf(hf_dir: str | Path, out_dir: str | Path, *, param_dtype: str | None = None,
                    overwrite: bool = False, progress: bool = True) -> Path:
    """HF Nemotron directory -> nemojax model checkpoint (config.yaml + params/), plus the HF
    directory's `tokenizer.model` when it has one (generate / serve pick it up from there)."""
    import shutil

    from nemojax.checkpoint import PARAMS_DIR, save_model

    if (Path(out_dir) / PARAMS_DIR).exists() and not overwrite:  # fail before reading any weights
        raise FileExistsError(f"{Path(out_dir) / PARAMS_DIR} already exists; pass overwrite=True "
                              f"(CLI: --force) to replace it")
    cfg, tied = hf_config_and_tied(hf_dir, param_dtype=param_dtype)
    params = load_hf_params(hf_dir, cfg, tied=tied, progress=progress)
    out = save_model(params, cfg, out_dir, overwrite=overwrite)
    if (Path(hf_dir) / "tokenizer.model").is_file():
        shutil.copyfile(Path(hf_dir) / "tokenizer.model", Path(out_dir) / "tokenizer.model")
    return out


# --------------------------------------------------------------------------- writing


_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9 bytes (decimal units like HF; KiB/MiB/GiB are binary); plain ints are bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConfigError(f"size {text!r} is not understood; write e.g. 5GB, 500MB, 2GiB or a byte count")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    size = int(float(m.group(1)) * scale)
    if size <= 0:
        raise ConfigError(f"size {text!r} must be positive")
    return size


@dataclass
class _Out:
    name: str
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray]
    dtype: np.dtype | None = None  # None: the file's dtype (quantized values and scales have their own)
    code: str | None = None

    def nbytes(self, default: np.dtype) -> int:
        return math.prod(self.shape) * (self.dtype or default).itemsize


def _write_safetensors(path: Path, entries: list[_Out], dtype: np.dtype, dtype_code: str,
                       on_tensor: Callable[[], None]) -> None:
    """Write one .safetensors file, producing each tensor only when its bytes are written.

    The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
    byte range in the data section), then the raw little-endian bytes. Because every shape is
    known up front, the header can be written first and the data streamed behind it.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        nbytes = e.nbytes(dtype)
        header[e.name] = {"dtype": e.code or dtype_code, "shape": list(e.shape),
                          "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data section starts 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for e in entries:
            arr = np.ascontiguousarray(e.produce(), dtype=e.dtype or dtype)
            if arr.shape != e.shape:
                raise CheckpointError(f"internal: tensor {e.name} produced shape {arr.shape}, header says {e.shape}")
            f.write(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes(order="C"))
            del arr
            on_tensor()
    tmp.replace(path)


def save_hf(params: dict[str, Any], cfg: ModelConfig, hf_dir: str | Path, *, dtype: str | None = None,
            max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, progress: bool = True) -> Path:
    """Write `params` (nemojax pure-dict of arrays) as a HF Nemotron directory.

    Writes config.json and model.safetensors, or model-0000k-of-0000n.safetensors shards plus
    model.safetensors.index.json when the total exceeds max_shard_size. A tensor larger than
    the shard size gets a shard of its own (tensors are never split). An fp8-quantized model
    (model.quant) is written in the compressed-tensors format (nemojax.convert.compressed_tensors):
    its projections as F8_E4M3 values with F32 `weight_scale`s, everything else in `dtype`.
    """
    import ml_dtypes
    from tqdm.auto import tqdm

    from nemojax.convert import compressed_tensors as ct
    from nemojax.model import quant

    if cfg.quant.enabled and (cfg.quant.mode != "fp8" or cfg.quant.block_size):
        raise CheckpointError(f"a {cfg.quant.mode} model with block_size {cfg.quant.block_size} has no Hugging Face "
                              f"export: the quantized format vLLM documents here is FP8 with one scale per output "
                              f"channel (compressed-tensors); export the full-precision checkpoint with --quantize "
                              f"fp8, or unquantized")

    dtype = dtype or cfg.param_dtype
    np_dtype = _np_dtype(dtype)
    code = _SAFETENSORS_DTYPES[dtype]
    limit = parse_size(max_shard_size)
    out = Path(hf_dir)
    out.mkdir(parents=True, exist_ok=True)

    def leaf(path: tuple[str, ...]) -> Any:
        node: Any = params
        for k in path:
            node = node[k]
        return node

    shapes = param_shapes(cfg)
    for tm in TENSOR_MAPS:
        got = tuple(leaf(tm.path).shape)
        if got != shapes[tm.path]:
            raise CheckpointError(f"parameter {'.'.join(tm.path)} has shape {list(got)}, expected "
                                  f"{list(shapes[tm.path])} from the model config")

    def producer(tm: TensorMap, layer: int | None) -> Callable[[], np.ndarray]:
        def produce() -> np.ndarray:
            arr = leaf(tm.path)
            arr = arr[layer] if layer is not None else arr  # one layer: device -> host per slice
            return tm.to_hf(np.asarray(arr))
        return produce

    def scale_producer(tm: TensorMap, layer: int) -> Callable[[], np.ndarray]:
        return lambda: ct.scale_to_hf(np.asarray(leaf(("blocks", quant.scale_name(tm.path[1])))[layer]), tm.n_in)

    # HF order: embeddings, then each layer's tensors together, then final norm and head.
    entries: list[_Out] = []
    by_layer: dict[int | None, list[_Out]] = {}
    fp8 = np.dtype(ml_dtypes.float8_e4m3fn)
    for tm, layer, name, shape in _expected_hf_tensors(cfg):
        if cfg.quant.enabled and tm.path[0] == "blocks" and tm.path[1] in quant.QUANT_TARGETS:
            scale_shape = shapes[("blocks", quant.scale_name(tm.path[1]))][1:]
            groups = math.prod(scale_shape[:tm.n_in])
            by_layer.setdefault(layer, []).extend([
                _Out(name, shape, producer(tm, layer), fp8, ct.SAFETENSORS_FP8),
                _Out(name + "_scale", (shape[0], groups), scale_producer(tm, layer), np.dtype(np.float32), "F32")])
            continue
        by_layer.setdefault(layer, []).append(_Out(name, shape, producer(tm, layer)))
    top = by_layer.pop(None)
    entries += [e for e in top if e.name == "model.embed_tokens.weight"]
    for layer in range(cfg.num_layers):
        entries += by_layer[layer]
    entries += [e for e in top if e.name != "model.embed_tokens.weight"]

    shards: list[list[_Out]] = [[]]
    size = 0
    for e in entries:
        nbytes = e.nbytes(np_dtype)
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]

    # Remove files of an earlier export so a stale index or shard cannot be mixed in.
    for stale in [out / INDEX_FILE, out / SINGLE_FILE, *out.glob("model-*-of-*.safetensors")]:
        if stale.exists():
            stale.unlink()
    bar = tqdm(total=len(entries), desc=f"writing {out.name}", unit="tensor", disable=not progress)
    for fname, shard in zip(names, shards):
        _write_safetensors(out / fname, shard, np_dtype, code, bar.update)
    bar.close()
    if n > 1:
        index = {"metadata": {"total_size": sum(e.nbytes(np_dtype) for e in entries)},
                 "weight_map": {e.name: fname for fname, shard in zip(names, shards) for e in shard}}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    hf_config = model_config_to_hf_config(cfg, dtype)
    if cfg.quant.enabled:
        hf_config["quantization_config"] = ct.quantization_config(cfg)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return out

def convert_to_hf(ckpt: str | Path, hf_dir: str | Path, *, dtype: str | None = None,
                  max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, progress: bool = True,
                  overwrite: bool = False, tokenizer: Any = "auto", quantize: str | None = None) -> Path:
    """Any checkpoint `nemojax.load` accepts -> HF Nemotron directory, tokenizer included.

    An fp8 checkpoint (or quantize="fp8": the projections quantized while loading) is written
    in the compressed-tensors format vLLM loads (nemojax.convert.compressed_tensors).

    overwrite: write into a non-empty `hf_dir` (otherwise FileExistsError before reading any
    weights). tokenizer: a `Tokenizer`, a spec for `load_tokenizer`, "auto" (the checkpoint's
    tokenizer.model if it has one, else the builtin one) or None (weights only).
    """
    from flax import nnx

    from nemojax.checkpoint import load_model
    from nemojax.convert.hf_tokenizer import save_hf_tokenizer
    from nemojax.data.tokenizer import load_tokenizer

    out = Path(hf_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; give a directory to write the Hugging Face checkpoint to")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pick a new directory or pass overwrite=True (CLI: --force) "
                              f"to replace its checkpoint files")
    auto = isinstance(tokenizer, str) and tokenizer == "auto"
    if auto:
        own = Path(ckpt) / "tokenizer.model"
        tokenizer = str(own) if own.is_file() else "builtin"
        auto = not own.is_file()
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)  # fail on a bad tokenizer before the weights
    model = load_model(ckpt, progress=progress, quantize=quantize)  # LoRA adapters come merged in
    if model.cfg.reward.enabled:
        raise CheckpointError(f"{ckpt} is a reward model; Hugging Face's Nemotron classes have no reward head, "
                              f"so it has no HF form (score with `nemojax reward score` instead)")
    if tokenizer is not None and tokenizer.vocab_size > model.cfg.vocab_size:
        if auto:  # the builtin tokenizer cannot be this model's: export the weights alone
            print(f"note: {ckpt} has no tokenizer.model and the builtin tokenizer ({tokenizer.vocab_size} pieces) "
                  f"does not fit its {model.cfg.vocab_size}-token vocabulary; no tokenizer exported "
                  f"(pass one with --tokenizer)", file=sys.stderr)
            tokenizer = None
        else:
            raise CheckpointError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model only "
                                  f"{model.cfg.vocab_size}; pass the checkpoint's own tokenizer")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    save_hf(params, model.cfg, out, dtype=dtype, max_shard_size=max_shard_size, progress=progress)
    if tokenizer is not None:
        save_hf_tokenizer(tokenizer, out, max_len=model.cfg.max_seq_len)
    return out
