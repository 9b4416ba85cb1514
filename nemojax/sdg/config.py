"""The pipeline YAML of `nemojax sdg run PIPELINE.yaml [key=value ...]`, key by key.

Loading, `base:` inheritance, `dotted.key=value` overrides and typo suggestions are
nemojax.config's own machinery; this module only declares the keys. Top level:

    run_dir: runs/sdg          where every stage writes (resumable: rerun the same command)
    seed: 0                    base of every request seed and random draw (deterministic runs)
    max_in_flight: 64          items a stage works on concurrently (keeps engine slots / HTTP busy)
    progress: true             a tqdm bar per stage
    templates: {}              prompt-template overrides by name (see nemojax/sdg/templates.py)
    clients:                   named LLM backends stages refer to (`client:` of a stage)
      NAME: ClientConfig       (below)
    reward: RewardConfig       the reward model, for reward_filter / preference stages
    stages:                    name -> stage, run in this order (see nemojax/sdg/stages/*.py for
      NAME: {kind: ..., ...}   each kind's keys: `nemojax sdg kinds` lists them)

A stage reads the output of the stage named by its `input:` (default: the stage before it) and
writes `<run_dir>/<name>.jsonl`. Overrides reach stage keys too: `stages.topics.n=20`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemojax import config as _nc  # YAML loading, overrides, typo-suggesting builder
from nemojax.config import ConfigError


@dataclass
class ClientConfig:
    """One LLM backend."""

    type: str = "engine"  # engine (in-process nemojax model) | openai (any OpenAI-compatible server) | scripted
    # --- engine
    checkpoint: str = ""  # nemojax checkpoint / run dir / step dir, or a Hugging Face Nemotron dir
    tokenizer: str = ""  # 'builtin', a .model file or a dir with tokenizer.model (default: the checkpoint's, else builtin)
    max_slots: int = 8  # samples decoded together
    max_len: int = 1024  # prompt + completion tokens per sample
    decode_steps: int = 16  # tokens per slot per host round-trip at most
    # true: every request's tokens are independent of the requests running beside it, so a run
    # resumed after a kill writes the same bytes as an uninterrupted one (docs/SDG.md, "Crash
    # safety and determinism"): one prompt per prefill call, no prefix cache across requests (the
    # samples of one request still share its prefill), one attention window (max_len) for every
    # decode call. false: batched prefill (max_prefill_batch), a prefix cache of 2 x max_len and
    # windows sized to the longest running sample: faster, but a resumed run may differ from an
    # uninterrupted one in a few sampled tokens.
    batch_invariant: bool = True
    max_prefill_batch: int = 8  # prompts prefilled together at most when batch_invariant is false
    min_bucket: int = 16  # smallest prompt-length bucket / attention window (= max_len: fewest compiles)
    program_cache: bool = True  # reuse the engine's compiled programs from disk across runs
    dtype: str = ""  # float32 | bfloat16 (default: the checkpoint's)
    quantize: str = ""  # int8 | fp8: weight-only quantization of the block projections at load ("" = as stored)
    # --- openai
    base_url: str = ""  # e.g. http://localhost:8000/v1 (nemojax serve), https://integrate.api.nvidia.com/v1
    model: str = ""  # the model id the server expects
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the key (unset: no auth header)
    timeout_s: float = 120.0  # per request
    max_concurrency: int = 16  # requests in flight
    max_retries: int = 6  # on 429 / 5xx / timeouts, exponential backoff, Retry-After honoured
    # --- scripted (deterministic replies; tests and dry runs)
    rules: list[list[str]] = field(default_factory=list)  # [[regex, reply], ...], first match wins
    default: str = ""  # reply when no rule matches
    delay_s: float = 0.0  # scripted: seconds each reply takes (to exercise concurrency / interruption)

    def validate(self, key: str) -> None:
        if self.type not in ("engine", "openai", "scripted"):
            raise ConfigError(f"{key}.type={self.type!r}: choose engine, openai or scripted")
        if self.type == "engine" and not self.checkpoint:
            raise ConfigError(f"{key}.checkpoint is required for an engine client (e.g. runs/tiny)")
        if self.max_prefill_batch < 1:
            raise ConfigError(f"{key}.max_prefill_batch must be >= 1")
        if self.quantize not in ("", "int8", "fp8"):
            raise ConfigError(f"{key}.quantize={self.quantize!r}: choose int8, fp8 or leave it empty (as stored)")
        if self.type == "openai" and not (self.base_url and self.model):
            raise ConfigError(f"{key}: an openai client needs base_url (e.g. http://localhost:8000/v1) and model")
        for i, rule in enumerate(self.rules):
            if not (isinstance(rule, list) and len(rule) == 2):
                raise ConfigError(f"{key}.rules[{i}] must be [regex, reply]")


@dataclass
class RewardConfig:
    """The reward model used as a judge."""

    type: str = "none"  # none | engine (a nemojax reward checkpoint in-process) | openai (NVIDIA reward API shape, or nemojax serve --reward-checkpoint)
    checkpoint: str = ""
    tokenizer: str = ""
    batch_size: int = 8
    max_len: int = 1024
    base_url: str = ""
    model: str = ""  # e.g. nvidia/nemotron-4-340b-reward
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 120.0
    max_concurrency: int = 16
    max_retries: int = 6
    weights: dict[str, float] = field(default_factory=dict)  # attribute -> weight (default: Nemotron-4-340B-Reward's)

    def validate(self, key: str = "reward") -> None:
        if self.type not in ("none", "engine", "openai"):
            raise ConfigError(f"{key}.type={self.type!r}: choose none, engine or openai")
        if self.type == "engine" and not self.checkpoint:
            raise ConfigError(f"{key}.checkpoint is required for an in-process reward model")
        if self.type == "openai" and not (self.base_url and self.model):
            raise ConfigError(f"{key}: an openai reward client needs base_url and model")


@dataclass
class PipelineConfig:
    run_dir: str = "runs/sdg"
    seed: int = 0
    max_in_flight: int = 64
    progress: bool = True
    templates: dict[str, str] = field(default_factory=dict)
    clients: dict[str, Any] = field(default_factory=dict)  # name -> ClientConfig
    reward: RewardConfig = field(default_factory=RewardConfig)
    stages: dict[str, Any] = field(default_factory=dict)  # name -> kind's StageSpec, in order


def build_pipeline(tree: dict[str, Any]) -> PipelineConfig:
    """A validated PipelineConfig from a raw YAML tree; errors name the key."""
    from nemojax.sdg.stages import stage_kinds
    from nemojax.sdg.templates import TEMPLATES

    raw = dict(tree)
    clients_raw = raw.pop("clients", {}) or {}
    stages_raw = raw.pop("stages", None)
    cfg = _nc._build(PipelineConfig, raw)
    if not isinstance(clients_raw, dict):
        raise ConfigError("clients must be a mapping of name -> client settings")
    for name, c in clients_raw.items():
        client = _nc._build(ClientConfig, c or {}, f"clients.{name}")
        client.validate(f"clients.{name}")
        cfg.clients[name] = client
    cfg.reward.validate()
    unknown = sorted(set(cfg.templates) - set(TEMPLATES))
    if unknown:
        raise ConfigError(f"templates: unknown template name(s) {unknown}; known: {', '.join(sorted(TEMPLATES))}")
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise ConfigError("stages must be a non-empty mapping of name -> {kind: ..., ...}")
    kinds = stage_kinds()
    previous = None
    for name, s in stages_raw.items():
        if not isinstance(s, dict) or "kind" not in s:
            raise ConfigError(f"stages.{name} needs a kind; one of {', '.join(sorted(kinds))}")
        kind = s["kind"]
        if kind not in kinds:
            import difflib

            close = difflib.get_close_matches(str(kind), list(kinds), n=3, cutoff=0.5)
            raise ConfigError(f"stages.{name}.kind={kind!r} is unknown"
                              + (f"; did you mean {', '.join(close)}?" if close else
                                 f"; kinds: {', '.join(sorted(kinds))}"))
        spec = _nc._build(kinds[kind].Spec, s, f"stages.{name}")
        if spec.input == "" and previous is not None and kinds[kind].needs_input:
            spec.input = previous
        if kinds[kind].needs_input and not spec.input:
            raise ConfigError(f"stages.{name} ({kind}) reads records: set its input (a stage name) or put a "
                              f"stage before it")
        if spec.input and spec.input not in cfg.stages:
            raise ConfigError(f"stages.{name}.input={spec.input!r} is not an earlier stage; earlier: "
                              f"{', '.join(cfg.stages) or 'none'}")
        spec.validate(f"stages.{name}", cfg)
        cfg.stages[name] = spec
        previous = name
    return cfg


def load_pipeline(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read PIPELINE.yaml (with `base:`), apply `key=value` overrides, validate."""
    tree = _nc._read_yaml(_nc.resolve_path(path))
    for item in overrides:
        _nc._apply_override(tree, item)
    return build_pipeline(tree)


def spec_dict(spec: Any) -> dict[str, Any]:
    return dataclasses.asdict(spec)
