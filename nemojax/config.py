"""Typed configuration: every key nemojax reads, its meaning, and its validation.

A config is a YAML file whose top level mirrors `Config` below. A file may name a
`base:` file (relative to itself) whose values it overrides, so presets compose:
`configs/tiny.yaml` says `base: models/tiny.yaml` and adds training settings.
Command-line overrides are `dotted.key=value` strings, parsed as YAML scalars.

Everything a user can get wrong fails here, at load time, with a `ConfigError` that
names the key and says what to change, never later from deep inside JAX.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config value a user must fix; the message says which key and how."""


# What each remat (activation checkpointing) policy keeps for the backward pass; the model maps
# the names to jax.checkpoint policies (nemojax.model.transformer.REMAT_POLICIES).
REMAT_POLICY_NAMES: dict[str, str] = {
    "none": "keep every activation (fastest, most memory)",
    "full": "recompute the whole block in backward (least memory)",
    "dots": "keep matmul outputs",
    "dots_no_batch": "keep matmul outputs without batch dims (weights-only dots)",
    "save_qkv_proj": "keep the q/k/v projections",
    "save_attn_mlp_out": "keep the attention and MLP block outputs",
    "save_qkv_attn_out": "keep the q/k/v projections and the attention output",
}


# --------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    """The Nemotron-4 architecture and how it is computed."""

    vocab_size: int = 256000
    hidden_size: int = 6144
    num_layers: int = 32
    num_heads: int = 48  # query heads
    num_kv_heads: int = 8  # GQA key/value heads; must divide num_heads
    head_dim: int = 128  # num_heads * head_dim need not equal hidden_size, but see validate()
    ffn_hidden_size: int = 24576  # squared-ReLU MLP width (4 x hidden in the paper)
    rotary_percentage: float = 0.5  # fraction of each head's dims that RoPE rotates
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.0134  # normal init std; output projections use std / sqrt(2 * layers)
    max_seq_len: int = 4096
    # Storage dtype of the weights. bfloat16 with compute_dtype bfloat16 is Megatron's mixed
    # precision (the 15B and 340B presets): bf16 weights and compute, an fp32 master copy of the
    # weights in the optimizer state, gradients accumulated, clipped and applied in fp32.
    # float32: the weights are their own master copy (compute_dtype still picks the matmul dtype).
    param_dtype: str = "float32"  # float32 | bfloat16
    compute_dtype: str = "float32"  # matmul/activation dtype: float32 | bfloat16
    remat_policy: str = "none"  # one of REMAT_POLICY_NAMES (below)
    # Self-attention kernel (nemojax.model.attention): auto = splash on TPU, cudnn on CUDA GPUs
    # with bfloat16 compute, xla elsewhere; xla (einsum reference, materialises seq x seq scores)
    # | splash (Pallas TPU flash kernel, segment ids) | cudnn (cuDNN flash, packed rows as ragged
    # sequences; bfloat16) | dot_product (jax.nn.dot_product_attention, XLA, dense mask).
    # The KV-cached decode always uses the xla formula.
    attention_backend: str = "auto"
    # cudnn only: the most segment runs (packed documents, padding) one row may hold on the flash
    # path; a batch with a fuller row takes cuDNN's dense-mask path (slower, same result).
    attention_max_segments: int = 64
    scan_layers: bool = True  # one compiled block scanned over stacked layer params
    bos_id: int = 2
    eos_id: int = 3
    pad_id: int = 0
    reward: RewardConfig = field(default_factory=lambda: RewardConfig())  # reward head, see RewardConfig
    lora: LoraConfig = field(default_factory=lambda: LoraConfig())  # low-rank adapters, see LoraConfig
    quant: QuantConfig = field(default_factory=lambda: QuantConfig())  # quantized block weights, see QuantConfig

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_percentage)

    def validate(self, prefix: str = "model") -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "ffn_hidden_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{prefix}.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"{prefix}.num_heads={self.num_heads} is not divisible by "
                f"{prefix}.num_kv_heads={self.num_kv_heads}: GQA needs every KV head to serve the "
                f"same number of query heads; pick num_kv_heads among "
                f"{[d for d in range(1, self.num_heads + 1) if self.num_heads % d == 0]}")
        if self.num_heads * self.head_dim != self.hidden_size:
            fix = self.hidden_size // self.num_heads if self.hidden_size % self.num_heads == 0 else None
            raise ConfigError(
                f"{prefix}.num_heads * {prefix}.head_dim = {self.num_heads} * {self.head_dim} = "
                f"{self.num_heads * self.head_dim} does not equal {prefix}.hidden_size={self.hidden_size}; "
                + (f"set {prefix}.head_dim={fix}" if fix else "change num_heads or hidden_size"))
        if not 0.0 < self.rotary_percentage <= 1.0:
            raise ConfigError(f"{prefix}.rotary_percentage must be in (0, 1], got {self.rotary_percentage}")
        rot = self.head_dim * self.rotary_percentage
        if rot != int(rot) or int(rot) % 2:
            raise ConfigError(
                f"{prefix}.rotary_percentage={self.rotary_percentage} with head_dim={self.head_dim} gives a "
                f"rotary dim of {rot}; RoPE rotates pairs, so head_dim * rotary_percentage must be an "
                f"even integer (e.g. rotary_percentage=0.5 with an even head_dim/2)")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16"):
                raise ConfigError(f"{prefix}.{name} must be float32 or bfloat16, got {getattr(self, name)!r}")
        if self.remat_policy not in REMAT_POLICY_NAMES:
            raise ConfigError(f"{prefix}.remat_policy={self.remat_policy!r} is unknown; choose one of "
                              f"{sorted(REMAT_POLICY_NAMES)}")
        backends = ("auto", "xla", "splash", "cudnn", "dot_product")  # nemojax.model.attention.BACKENDS
        if self.attention_backend not in backends:
            raise ConfigError(f"{prefix}.attention_backend={self.attention_backend!r} is unknown; choose "
                              f"one of {', '.join(backends)}")
        if self.attention_max_segments < 2:
            raise ConfigError(f"{prefix}.attention_max_segments must be >= 2 (a document and the "
                              f"padding after it), got {self.attention_max_segments}")
        if self.init_std <= 0:
            raise ConfigError(f"{prefix}.init_std must be positive, got {self.init_std}")
        self.quant.validate(f"{prefix}.quant")
        if self.quant.mode == "nf4" and any(d % 2 for d in (self.hidden_size, self.ffn_hidden_size, self.head_dim)):
            raise ConfigError(f"{prefix}.quant.mode=nf4 packs two 4-bit codes per byte along each weight's last dim: "
                              f"hidden_size, ffn_hidden_size and head_dim must be even")
        if self.quant.block_size:
            dims = {"hidden_size": self.hidden_size, "ffn_hidden_size": self.ffn_hidden_size,
                    "num_heads * head_dim": self.num_heads * self.head_dim}
            bad = {k: v for k, v in dims.items() if v % self.quant.block_size}
            if bad:
                raise ConfigError(f"{prefix}.quant.block_size={self.quant.block_size} must divide every projection's "
                                  f"input size, but not {bad}; pick a divisor of all of {sorted(set(dims.values()))} "
                                  f"(or 0: one scale per output channel)")
            if self.head_dim % self.quant.block_size and self.quant.block_size % self.head_dim:
                raise ConfigError(f"{prefix}.quant.block_size={self.quant.block_size}: a block of the attention "
                                  f"output projection's input (heads x head_dim) must cover whole heads or divide "
                                  f"head_dim={self.head_dim}")


MESH_AXIS_NAMES = ("data", "fsdp", "pipeline", "tensor")


@dataclass
class MeshConfig:
    """The shape of the device mesh (see nemojax.parallel.mesh): four named axes.

    Sizes are global (whole job); their product must equal the device count, and one axis may
    be -1 to take the rest. How arrays are laid onto the mesh is `sharding:`; how the layers
    are scheduled over `pipeline` is `pipeline:`.
    """

    data: int = -1  # data-parallel replicas (batch split; params replicated unless fsdp / ZeRO-1)
    fsdp: int = 1  # fully sharded data parallel: batch split AND params/grads/opt state sharded
    pipeline: int = 1  # pipeline stages (layers split into consecutive stages)
    tensor: int = 1  # Megatron tensor parallel: heads, kv_heads, mlp and vocab split
    # DCN factor per axis for hybrid meshes: how many slices (TPU) / nodes (GPU) the axis spans.
    # It must divide the axis size; e.g. data=16 dcn_data=4 = 4 slices x 4-way data inside each.
    # Put DCN on data (or pipeline), rarely on fsdp, never on tensor.
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_pipeline: int = 1
    dcn_tensor: int = 1

    def validate(self, prefix: str = "mesh") -> None:
        sizes = {a: getattr(self, a) for a in MESH_AXIS_NAMES}
        if sum(1 for v in sizes.values() if v == -1) > 1:
            raise ConfigError(f"{prefix}: at most one axis may be -1, got {sizes}")
        for k, v in sizes.items():
            if v == 0 or v < -1:
                raise ConfigError(f"{prefix}.{k} must be a positive size or -1, got {v}")
        for k, v in sizes.items():
            dcn = getattr(self, f"dcn_{k}")
            if dcn < 1:
                raise ConfigError(f"{prefix}.dcn_{k} must be >= 1, got {dcn}")
            if v != -1 and v % dcn:
                raise ConfigError(f"{prefix}.dcn_{k}={dcn} does not divide {prefix}.{k}={v}; the DCN "
                                  f"factor counts the slices/nodes the axis spans and must divide it")


@dataclass
class PipelineConfig:
    """The schedule over the `pipeline` mesh axis (nemojax.parallel.pipeline); used when the
    resolved mesh has more than one pipeline stage."""

    virtual_stages: int = 1  # chunks of consecutive layers per stage (Megatron's interleaving)
    microbatches: int = 1  # pipeline microbatches per gradient-accumulation slice

    def validate(self, prefix: str = "pipeline") -> None:
        for k in ("virtual_stages", "microbatches"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{prefix}.{k} must be >= 1, got {getattr(self, k)}")


@dataclass
class ShardingConfig:
    """How parameters, optimizer state and activations are laid onto the mesh
    (nemojax.parallel.rules maps logical axis names to mesh axes)."""

    # ZeRO-1 / distributed optimizer: optimizer state (and the fp32 master copy of bf16
    # params) additionally sharded over `data`; params stay replicated over `data`.
    # false = optimizer state sharded exactly like the params.
    zero1: bool = True
    # ZeRO-2: the fp32 gradient is reduce-scattered over `data` (once per step, after every
    # micro-batch has been accumulated) into the shard of it the ZeRO-1 optimizer state holds;
    # clipping and the update run on that shard and the new weights are all-gathered once.
    # false: the gradient is all-reduced over `data` (also once per step, in fp32) and every
    # data replica holds all of it. Needs zero1 (the shard is the optimizer state's).
    zero2: bool = False
    # Shard activations between blocks along the sequence over `tensor` (rules.length=tensor).
    sequence_parallel: bool = False
    # Logical axis -> mesh axis, list of mesh axes, or null (replicated); overrides
    # nemojax.parallel.rules.DEFAULT_RULES per key, e.g. {kv_heads: null, embed: [fsdp, data]}.
    rules: dict[str, Any] = field(default_factory=dict)

    def validate(self, prefix: str = "sharding") -> None:
        if self.zero2 and not self.zero1:
            raise ConfigError(f"{prefix}.zero2=true needs {prefix}.zero1=true: the gradient is scattered into "
                              f"the optimizer state's shards; set {prefix}.zero1=true or {prefix}.zero2=false")
        if not isinstance(self.rules, dict):
            raise ConfigError(f"{prefix}.rules must be a mapping of logical axis -> mesh axis")
        for k, v in self.rules.items():
            vals = [v] if isinstance(v, str) else ([] if v is None else v)
            if not isinstance(vals, list) or any(x not in MESH_AXIS_NAMES for x in vals):
                raise ConfigError(f"{prefix}.rules.{k}={v!r}: use a mesh axis name "
                                  f"({', '.join(MESH_AXIS_NAMES)}), a list of them, or null")


@dataclass
class OptimizerConfig:
    """AdamW with warmup and a decay schedule (see nemojax.train.optim)."""

    learning_rate: float = 3e-4  # peak learning rate
    min_learning_rate: float = 3e-5  # floor of the cosine / decay phase
    schedule: str = "cosine"  # cosine | constant | wsd (warmup-stable-decay)
    warmup_steps: int = 100
    decay_steps: int = 0  # 0 = decay until `steps`; for wsd: length of the final decay phase
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # applied to matrices only (not norms or embeddings' biases)
    grad_clip: float = 1.0  # global-norm clipping; 0 disables


@dataclass
class DataSourceConfig:
    """One source of a blend: where its documents are and how much of the blend it gets.

    See nemojax/data/sources.py for the file schemas.
    """

    # A file, a directory (every file in it) or a glob; or "builtin:prose" / "builtin:code"
    # for the corpus that ships with nemojax (built from the Python standard library).
    path: str = ""
    # jsonl | parquet | arrayrecord (pre-tokenized int32 ids) | builtin; "auto" infers it
    # from the path ("builtin:" prefix or the file suffix).
    format: str = "auto"
    # Relative share of training rows (normalised over the blend; 0 drops the source).
    weight: float = 1.0
    # JSONL key / Parquet column holding each document's text (unused for arrayrecord/builtin).
    text_field: str = "text"

    def validate(self, prefix: str) -> None:
        if not self.path:
            raise ConfigError(f"{prefix}.path is empty; give a file, directory, glob or builtin:prose")
        if self.format not in ("auto", "jsonl", "parquet", "arrayrecord", "builtin"):
            raise ConfigError(f"{prefix}.format={self.format!r} is unknown; use auto, jsonl, parquet, "
                              f"arrayrecord or builtin")
        if self.weight < 0:
            raise ConfigError(f"{prefix}.weight must be >= 0, got {self.weight}")
        if not self.text_field:
            raise ConfigError(f"{prefix}.text_field must name the text key/column, got an empty string")


def _default_sources() -> list[DataSourceConfig]:
    # The built-in corpus, blended like Nemotron's 70% natural language / 30% other.
    return [DataSourceConfig(path="builtin:prose", weight=0.7), DataSourceConfig(path="builtin:code", weight=0.3)]


@dataclass
class DataConfig:
    """Pretraining data: a weighted blend of sources, tokenized and packed (nemojax.data.pretrain)."""

    # Path to a SentencePiece .model (or a directory holding tokenizer.model), or "builtin"
    # for the shipped 4096-piece model (matches configs/models/tiny.yaml's vocab_size).
    tokenizer: str = "builtin"
    # Training blend; each row of a batch comes from one source, chosen so that the row
    # counts follow the weights exactly (within one row) at every point of the stream.
    sources: list[DataSourceConfig] = field(default_factory=_default_sources)
    # Validation blend. Empty: hold out `validation_fraction` of each training source's
    # documents (chosen by a hash of the document index, so the split never changes).
    validation: list[DataSourceConfig] = field(default_factory=list)
    validation_fraction: float = 0.01
    seq_len: int = 256  # tokens per packed row
    global_batch_size: int = 8  # sequences per optimizer step (before ramp-up stages)
    micro_batch_size: int = 0  # sequences per forward/backward; 0 = global batch (no accumulation)
    # Batch-size ramp-up: list of {batch_size, until_tokens}; empty = constant global_batch_size.
    rampup: list[dict[str, Any]] = field(default_factory=list)
    # Seed of the document order (per source, reshuffled each epoch). null = the run's top-level
    # `seed`, so `seed=N` changes both the initialisation and the data order; set a number here to
    # pin the data order while varying the initialisation. The validation order is fixed and
    # independent of both.
    shuffle_seed: int | None = None
    # What a new stage started with `init_from` (e.g. continued pretraining) does with the data
    # stream of the training run it starts from:
    #   continue:  every source that run also read (same path and format) picks up where that
    #              run stopped, so no document is seen again before its epoch ends; sources new
    #              to the blend start at their beginning. (Nothing to continue from a model
    #              checkpoint or a Hugging Face directory: every source starts fresh.)
    #   reshuffle: every source starts a fresh order drawn from this stage's shuffle seed, which
    #              must differ from the previous run's for any source both read (else the stage
    #              would replay the documents that run saw first): the run refuses to start.
    stage_start: str = "continue"
    # concat: documents laid end to end, cut at row ends (no padding, Megatron style);
    # pad: a document that does not fit the rest of a row starts the next row (padding).
    pack_mode: str = "concat"
    worker_count: int = 0  # reserved for multi-process loading; 0 = load in the training process

    def validate(self, prefix: str = "data") -> None:
        if self.seq_len < 2:
            raise ConfigError(f"{prefix}.seq_len must be >= 2, got {self.seq_len}")
        if self.global_batch_size < 1:
            raise ConfigError(f"{prefix}.global_batch_size must be >= 1, got {self.global_batch_size}")
        if not self.sources:
            raise ConfigError(f"{prefix}.sources is empty; list at least one source "
                              f"(e.g. {{path: builtin:prose}})")
        for i, src in enumerate(self.sources):
            src.validate(f"{prefix}.sources[{i}]")
        for i, src in enumerate(self.validation):
            src.validate(f"{prefix}.validation[{i}]")
        if sum(s.weight for s in self.sources) <= 0:
            raise ConfigError(f"{prefix}.sources: the weights sum to 0; give at least one a positive weight")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(f"{prefix}.validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.pack_mode not in ("concat", "pad"):
            raise ConfigError(f"{prefix}.pack_mode={self.pack_mode!r} is unknown; use concat or pad")
        if self.shuffle_seed is not None and (not isinstance(self.shuffle_seed, int)
                                              or isinstance(self.shuffle_seed, bool)
                                              or not 0 <= self.shuffle_seed < 2**32):
            raise ConfigError(f"{prefix}.shuffle_seed must be null or an integer in [0, 2**32), "
                              f"got {self.shuffle_seed!r}")
        if self.stage_start not in ("continue", "reshuffle"):
            raise ConfigError(f"{prefix}.stage_start={self.stage_start!r} is unknown; use continue or reshuffle")


@dataclass
class DistributedConfig:
    """Joining a multi-host job (see nemojax.parallel.distributed); unset values come from the
    environment (NEMOJAX_* / JAX_* variables, SLURM, a Cloud TPU pod), else a single process."""

    coordinator_address: str = ""  # host:port of process 0; "" = from the environment
    num_processes: int = 0  # 0 = from the environment
    process_id: int = -1  # -1 = from the environment

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.coordinator_address:
            out["coordinator_address"] = self.coordinator_address
        if self.num_processes > 0:
            out["num_processes"] = self.num_processes
        if self.process_id >= 0:
            out["process_id"] = self.process_id
        return out


@dataclass
class Config:
    """A whole run. `steps`, `seed`, `run_dir`, `checkpoint_every` are top-level by contract."""

    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    stage: StageConfig = field(default_factory=lambda: StageConfig())  # post-training stage, see StageConfig
    run_dir: str = "runs/default"
    steps: int = 1000
    seed: int = 0  # parameter initialisation, and the data order unless data.shuffle_seed is set
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    init_from: str = ""  # continued pretraining: start from this checkpoint's weights, fresh optimizer
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 = look it up from the device kind

    def validate(self) -> None:
        self.model.validate("model")
        self.mesh.validate("mesh")
        self.pipeline.validate("pipeline")
        self.sharding.validate("sharding")
        self.data.validate("data")
        check_stage(self)
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2**32), got {self.seed}")
        if self.steps < 0:
            raise ConfigError(f"steps must be >= 0, got {self.steps}")
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len="
                              f"{self.model.max_seq_len}; lower data.seq_len or raise model.max_seq_len")
        if self.model.quant.enabled and self.stage.kind == "pretrain":
            raise ConfigError(f"model.quant.mode={self.model.quant.mode} trains LoRA adapters on a frozen quantized base "
                              f"(QLoRA), a post-training stage: set stage.kind (sft, reward, dpo, ...) or drop model.quant")
        if self.model.quant.enabled and not self.model.lora.rank:
            raise ConfigError(f"model.quant.mode={self.model.quant.mode}: a quantized base is frozen, so a run trains "
                              f"LoRA adapters on it (QLoRA): set model.lora.rank > 0. To serve quantized weights, "
                              f"use --quantize or `nemojax convert quantize` on the trained checkpoint")

    @property
    def data_seed(self) -> int:
        """The seed of the training data order: data.shuffle_seed, else the top-level seed."""
        return self.seed if self.data.shuffle_seed is None else self.data.shuffle_seed


# --------------------------------------------------------------------------- loading


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if path in seen:
        raise ConfigError(f"config base cycle: {' -> '.join(str(p) for p in (*seen, path))}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping at top level, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    base_path = (path.parent / base).resolve()
    if not base_path.exists() and (CONFIG_DIR / base).exists():
        base_path = CONFIG_DIR / base
    return _deep_merge(_read_yaml(base_path, (*seen, path)), raw)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "rules":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _apply_override(tree: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. model.num_layers=4)")
    key, text = item.split("=", 1)
    key = key.strip()
    value = yaml.safe_load(text) if text.strip() else ""
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {p!r} is a value, not a section")
    node[parts[-1]] = value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if origin in (list,):
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict,):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    return value


# Keys that moved to another section: a config still using the old name gets told the new one.
MOVED_KEYS: dict[str, str] = {
    "mesh.virtual_stages": "pipeline.virtual_stages",
    "mesh.microbatches": "pipeline.microbatches",
    "mesh.zero1": "sharding.zero1",
    "mesh.sequence_parallel": "sharding.sequence_parallel",
    "mesh.rules": "sharding.rules",
}


def _build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in raw.items():
        full = f"{prefix}.{k}" if prefix else k
        if full in MOVED_KEYS:
            raise ConfigError(f"config key {full!r} has moved: write {MOVED_KEYS[full]}={v!r} instead "
                              f"(mesh: is the mesh shape only; pipeline: the schedule; sharding: the layout)")
        if k not in names:
            close = difflib.get_close_matches(k, names, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join((prefix + '.' if prefix else '') + c for c in close)}?" \
                if close else f"; valid keys here: {', '.join(names)}"
            raise ConfigError(f"unknown config key {full!r}{hint}")
        kwargs[k] = _coerce(v, hints[k], full)
    return cls(**kwargs)


def resolve_path(path: str | Path) -> Path:
    """A config path as given, or relative to the shipped configs/ directory."""
    p = Path(path)
    if p.exists():
        return p.resolve()
    for cand in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml", CONFIG_DIR / "models" / f"{p}.yaml"):
        if cand.exists():
            return cand
    raise ConfigError(f"config file not found: {path} (also looked under {CONFIG_DIR}){_close_config(path)}")


def _close_config(path: str | Path) -> str:
    """`; did you mean ...?` naming shipped presets / configs close to a mistyped name, or ""."""
    if not CONFIG_DIR.is_dir():
        return ""
    names = {f.stem for f in (CONFIG_DIR / "models").glob("*.yaml")}
    names |= {str(f.relative_to(CONFIG_DIR).with_suffix("")) for f in CONFIG_DIR.rglob("*.yaml")}
    given = str(path).removesuffix(".yaml").removeprefix("configs/")
    close = difflib.get_close_matches(given, sorted(names), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or the defaults when path is None), apply overrides, validate."""
    tree = _read_yaml(resolve_path(path)) if path is not None else {}
    for item in overrides:
        _apply_override(tree, item)
    cfg = _build(Config, tree)
    cfg.validate()
    return cfg


def config_from_dict(tree: dict[str, Any]) -> Config:
    cfg = _build(Config, tree)
    cfg.validate()
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# --------------------------------------------------------------------------- post-training sections
# Added for the reward model and LoRA (issue 9). Both live under `model:` because they change
# which parameters a model has: a checkpoint's model section must describe all of them.
# They validate on construction (at load time, like every other key), naming the key to fix.

HELPSTEER2_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
# Nemotron-4-340B-Reward's published aggregation: reward = sum over attributes of weight * score.
NEMOTRON4_340B_REWARD_WEIGHTS = {"helpfulness": 0.3, "correctness": 0.74, "coherence": 0.46,
                                 "complexity": 0.47, "verbosity": -0.33}
LORA_TARGETS = ("q", "k", "v", "o", "up", "down")


@dataclass
class RewardConfig:
    """model.reward: a regression reward head instead of the LM head (nemojax.model.reward).

    The head is a linear layer with bias on the final hidden state of the last token (the
    `<extra_id_2>` that ends the scored response), one output per attribute.
    """

    enabled: bool = False  # true: the model is a reward model (no LM head); false: a language model
    # Output names, in head order. NeMo's HelpSteer2 recipe uses 9: quality, toxicity, humor,
    # creativity, helpfulness, correctness, coherence, complexity, verbosity.
    attributes: list[str] = field(default_factory=lambda: list(HELPSTEER2_ATTRIBUTES))
    # Scalar reward = sum of weight * attribute score; attributes not listed weigh 0, so the
    # 9-output layout with these defaults gives Nemotron-4-340B-Reward's [0,0,0,0,.3,.74,.46,.47,-.33].
    weights: dict[str, float] = field(default_factory=lambda: dict(NEMOTRON4_340B_REWARD_WEIGHTS))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, prefix: str = "model.reward") -> None:
        if not self.attributes or not all(isinstance(a, str) and a for a in self.attributes):
            raise ConfigError(f"{prefix}.attributes must be a non-empty list of names, got {self.attributes!r}")
        if len(set(self.attributes)) != len(self.attributes):
            raise ConfigError(f"{prefix}.attributes repeats a name: {self.attributes}")
        if "reward" in self.attributes:
            raise ConfigError(f"{prefix}.attributes may not include 'reward': it names the weighted sum")
        if not isinstance(self.weights, dict):
            raise ConfigError(f"{prefix}.weights must map attribute name -> weight, got {self.weights!r}")
        unknown = sorted(set(self.weights) - set(self.attributes))
        if unknown:
            raise ConfigError(f"{prefix}.weights names {unknown}, which are not in {prefix}.attributes "
                              f"{self.attributes}; weigh only attributes the head predicts")
        for k, v in self.weights.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"{prefix}.weights.{k} must be a number, got {v!r}")

    def weight_vector(self) -> list[float]:
        """One weight per attribute, in head order (0 for attributes without a weight)."""
        return [float(self.weights.get(a, 0.0)) for a in self.attributes]


@dataclass
class LoraConfig:
    """model.lora: low-rank adapters on the block projections (nemojax.model.lora).

    Each targeted weight W is used as W + (alpha / rank) * A @ B, with A [in, rank] (normal init)
    and B [rank, out] (zeros, so a fresh adapter leaves the model unchanged). Only adapters
    are trained when rank > 0; the base model is the model with adapters off.
    """

    rank: int = 0  # 0 = no adapters
    alpha: float = 16.0  # scale numerator: the update is (alpha / rank) * A @ B
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # subset of q k v o up down
    init_std: float = 0.02  # std of A's normal init (B starts at zero)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, prefix: str = "model.lora") -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ConfigError(f"{prefix}.rank must be an integer >= 0 (0 = no adapters), got {self.rank!r}")
        if self.rank and self.alpha <= 0:
            raise ConfigError(f"{prefix}.alpha must be positive, got {self.alpha}")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or (self.rank and not self.targets) or len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"{prefix}.targets={self.targets!r}: give a non-repeating subset of "
                              f"{list(LORA_TARGETS)}")
        if self.init_std <= 0:
            raise ConfigError(f"{prefix}.init_std must be positive, got {self.init_std}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0


QUANT_MODES = ("none", "int8", "fp8", "nf4")


@dataclass
class QuantConfig:
    """model.quant: weight-only quantization of the block projections (nemojax.model.quant).

    The six projections of every block (q, k, v, o, MLP up and down) are stored as low-precision
    values with fp32 scales and dequantized inside their matmuls; embeddings, the LM head and the
    norms keep `param_dtype`; activations and the KV cache keep `compute_dtype`. A quantized base
    is frozen: with `model.lora.rank > 0` it is QLoRA (only the adapters train); without adapters
    a quantized model is for inference (`nemojax generate/serve/eval --quantize`).
    """

    # none | int8 (symmetric, scale = absmax / 127) | fp8 (float8 e4m3fn, scale = absmax / 448) |
    # nf4 (QLoRA's 4-bit NormalFloat codes, scale = absmax; needs block_size)
    mode: str = "none"
    # Input elements that share one scale, per output channel; 0 = one scale per output channel
    # (the whole input). A block runs along the flattened input (heads x head_dim for the
    # attention output). QLoRA's NF4 uses 64.
    block_size: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, prefix: str = "model.quant") -> None:
        if self.mode not in QUANT_MODES:
            raise ConfigError(f"{prefix}.mode={self.mode!r} is unknown; choose one of {list(QUANT_MODES)}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 0:
            raise ConfigError(f"{prefix}.block_size must be an integer >= 0 (0 = per output channel), "
                              f"got {self.block_size!r}")
        if self.mode == "nf4" and not self.block_size:
            raise ConfigError(f"{prefix}.mode=nf4 needs {prefix}.block_size > 0 (QLoRA uses 64): one absmax per "
                              f"whole input row leaves too few of the 16 levels for most weights")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


# --------------------------------------------------------------------------- post-training stages
# `stage:` says what a run trains: pretraining (the default: `data.sources`, next-token loss) or
# one post-training stage on chat records (nemojax.train.stages runs them; docs/DATA.md has the
# record schemas, docs/ALIGNMENT.md the recipes). The Nemotron-4 Instruct recipe is
#   sft (code)  ->  sft (general, replaying 2% code)  ->  dpo  ->  rpo_bwd_kl x 3 rounds
# with a `reward` model as the judge. A stage reuses everything else in the config unchanged:
# model (plus model.reward / model.lora), mesh, sharding, optimizer, steps, checkpoints.
# Sequence length is `data.seq_len` (SFT: packed row length; preference and reward: tokens per
# prompt + response); `data.global_batch_size` counts rows (SFT rows, pairs, scored responses);
# the tokenizer is `data.tokenizer`; `data.shuffle_seed` / `seed` order the examples.

PREFERENCE_STAGE_KINDS = ("dpo", "ipo", "rpo_bwd_kl", "rpo_fwd_kl", "rpo_sq")
STAGE_KINDS = ("pretrain", "sft", "reward", *PREFERENCE_STAGE_KINDS)


@dataclass
class StageConfig:
    """stage: the training stage and its post-training data and loss settings."""

    # pretrain | sft | reward | dpo | ipo | rpo_bwd_kl (the Nemotron-4 report's RPO) | rpo_fwd_kl | rpo_sq.
    # sft trains next-token loss on assistant turns; reward regresses model.reward.attributes
    # (needs model.reward.enabled: true); the others are preference losses
    # (nemojax.train.losses.preference_loss) on (prompt, chosen, rejected) pairs.
    kind: str = "pretrain"
    # Training records of the stage's kind: a JSONL / Parquet file, a directory or a glob
    # (Hugging Face `datasets` exports load directly). sft: conversations; reward: HelpSteer2
    # columns; preference kinds: pairs. Relative paths are taken from the working directory.
    train: str = ""
    # Held-out records of the same kind. "" = hold out `validation_fraction` of `train` (chosen
    # by a hash of the record's position, so the split never changes).
    validation: str = ""
    validation_fraction: float = 0.05
    # Over-length examples (longer than data.seq_len): truncate = cut the prompt from the left
    # (bos kept, the response never cut); drop = leave them out. Counts are logged at start.
    overlength: str = "truncate"
    # Malformed records: fail = stop before training with every bad file:line listed; skip = leave them out.
    on_bad: str = "fail"
    # > 0: train this many passes over `train` (steps = ceil(epochs * rows / data.global_batch_size),
    # replacing `steps`); 0 = train `steps` steps (the stream wraps to a new shuffled epoch).
    epochs: float = 0.0

    # ---- sft
    # Records replayed from an earlier stage (the general SFT stage replays the code SFT data);
    # "" = none. `replay_fraction` of the training rows come from it, within one row at every point.
    replay: str = ""
    replay_fraction: float = 0.02

    # ---- preference kinds (NeMo-Aligner conventions, see nemojax.train.losses)
    beta: float = 0.1  # KL penalty: multiplies Delta (policy-vs-reference log-ratio gap) exactly once
    eta: float = 1.0  # RPO reward scale: target gap = eta * (chosen_reward - rejected_reward)
    preference_weight: float = 1.0  # weight of the preference loss in the total
    sft_weight: float = 0.0  # weight of the SFT term, -log pi(chosen), in the total (paper: 1e-5..1e-3)
    average_log_probs: bool = False  # false: per-response log-probs summed over tokens; true: averaged
    # The reference policy: "" = the weights training starts from (init_from, else the fresh
    # init; with LoRA the base with adapters off), or a checkpoint path. Its per-pair log-probs
    # are computed once, before training, and cached (no second model resident while training).
    reference: str = ""
    # Where the cached reference log-probs go: "" = <run_dir>/reference/. A cache is reused only
    # for exactly the same tokenized data, settings and reference weights.
    reference_cache: str = ""
    # RPO's rewards: "" = the records' chosen_reward / rejected_reward fields (every pair must
    # have them); a reward checkpoint = score both responses of every pair with it first (the
    # scored records are written under <run_dir>/rewards/ and reused on resume).
    reward_model: str = ""
    reward_batch_size: int = 8  # sequences per reward-scoring batch
    # Several RPO rounds in one config: round r runs in <run_dir>/round_<r>, initialised from and
    # referenced to round r-1's final weights (round 1: init_from). 1 = a single run in run_dir.
    rounds: int = 1
    # Training records per round (one entry per round, e.g. pairs generated with the previous
    # round's policy); [] = `train` for every round.
    round_train: list[str] = field(default_factory=list)

    # ---- validation extras
    # Preference pairs for extra held-out metrics: reward stage = pairwise accuracy (chosen scored
    # above rejected); sft stage = the policy's preference accuracy (log p(chosen) > log p(rejected)).
    preference_validation: str = ""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def is_preference(self) -> bool:
        return self.kind in PREFERENCE_STAGE_KINDS

    @property
    def needs_rewards(self) -> bool:
        return self.kind.startswith("rpo")

    def validate(self, prefix: str = "stage") -> None:
        if self.kind not in STAGE_KINDS:
            close = difflib.get_close_matches(str(self.kind), STAGE_KINDS, n=1)
            raise ConfigError(f"{prefix}.kind={self.kind!r} is unknown" + (f" (did you mean {close[0]!r}?)" if close
                                                                            else "") + f"; choose one of {', '.join(STAGE_KINDS)}")
        if self.overlength not in ("truncate", "drop"):
            raise ConfigError(f"{prefix}.overlength={self.overlength!r}: use truncate (cut the prompt from the left) "
                              f"or drop")
        if self.on_bad not in ("fail", "skip"):
            raise ConfigError(f"{prefix}.on_bad={self.on_bad!r}: use fail or skip")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(f"{prefix}.validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if not 0.0 <= self.replay_fraction < 1.0:
            raise ConfigError(f"{prefix}.replay_fraction must be in [0, 1), got {self.replay_fraction}")
        if self.epochs < 0:
            raise ConfigError(f"{prefix}.epochs must be >= 0 (0 = use steps), got {self.epochs}")
        for k in ("beta", "eta"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"{prefix}.{k} must be positive, got {getattr(self, k)}")
        for k in ("preference_weight", "sft_weight"):
            if getattr(self, k) < 0:
                raise ConfigError(f"{prefix}.{k} must be >= 0, got {getattr(self, k)}")
        if self.reward_batch_size < 1:
            raise ConfigError(f"{prefix}.reward_batch_size must be >= 1, got {self.reward_batch_size}")
        if self.rounds < 1:
            raise ConfigError(f"{prefix}.rounds must be >= 1, got {self.rounds}")
        if self.round_train and len(self.round_train) != self.rounds:
            raise ConfigError(f"{prefix}.round_train lists {len(self.round_train)} file(s) for {prefix}.rounds="
                              f"{self.rounds}; give one per round or none")
        if self.kind == "pretrain":
            return
        if not self.train and not self.round_train:
            raise ConfigError(f"{prefix}.train is empty: stage {self.kind!r} needs training records "
                              f"(a JSONL / Parquet file, directory or glob)")
        if self.rounds > 1 and not self.is_preference:
            raise ConfigError(f"{prefix}.rounds={self.rounds}: rounds are for preference stages (RPO), not {self.kind}")
        if self.replay and self.kind != "sft":
            raise ConfigError(f"{prefix}.replay is for sft stages (general SFT replaying code SFT data)")
        if self.reward_model and not self.needs_rewards:
            raise ConfigError(f"{prefix}.reward_model is only used by the rpo_* kinds (their target reward gap); "
                              f"{self.kind} does not read rewards")


def check_stage(cfg: Config) -> None:
    """Checks that need the stage and the rest of the config together."""
    st, m = cfg.stage, cfg.model
    if st.kind == "pretrain":
        return
    if st.kind == "reward" and not m.reward.enabled:
        raise ConfigError("stage.kind=reward trains a reward model: set model.reward.enabled=true")
    if st.kind != "reward" and m.reward.enabled:
        raise ConfigError(f"stage.kind={st.kind} trains a language model, but model.reward.enabled is true; "
                          f"set it to false (or stage.kind=reward)")
    if st.epochs and cfg.data.rampup:
        raise ConfigError("stage.epochs with data.rampup: give steps instead of epochs when the batch size ramps up")
