"""The YAML of `nemojax align CONFIG [key=value ...]`, key by key.

    run_dir: runs/align            everything of the run lives here (rerun the command to resume)
    seed: 0                        passed to every training stage and the SDG pipelines
    tokenizer: ""                  tokenizer of every stage; "" = the toy world's (if any), else the
                                   training configs' own data.tokenizer
    leak_audit: fail               check every file a step trains on against the eval suites' items
                                   (nemojax.align.leaks): fail = a hit stops the run, warn = log and
                                   count it, off = no audit; counted in summary.json["leak_audit"]
    world:                         optional: build the toy world (nemojax.align.toy_world) first
      enabled: false               and refer to its files as {world}/... (see ToyWorldSpec)
      spec: {...}                  ToyWorldSpec fields (seed, families, pretrain_documents, ...)
    bases:                         named base checkpoints; each either exists or is pretrained here
      NAME:
        checkpoint: ""             an existing nemojax / Hugging Face checkpoint, or
        config: ""                 a training config pretrained into {run_dir}/bases/NAME
        init_from: ""              another base's name: continued pretraining from it
        overrides: []              key=value overrides of that config
    generator:                     the first iteration's generator
      checkpoint: ""               an existing aligned model, or
      base: ""                     a base aligned by `stages` (e.g. seed SFT) into {run_dir}/generator
      stages: []
    iterations:                    one entry per weak-to-strong iteration
      - base: NAME                 the base this iteration aligns
        stages: []                 stage names in order ([] = `pipeline`)
        sdg_overrides: []          extra overrides of this iteration's SDG pipeline
    pipeline: [code_sft, general_sft, dpo, rpo]   the default stage order of an iteration
    stages:                        stage name -> how it trains
      NAME:
        config: ""                 a training config (configs/sft_code.yaml, configs/dpo.yaml, ...)
        overrides: []              key=value overrides; placeholders below are filled in
    sdg:                           the data-generation pipeline each iteration runs first
      config: ""                   an SDG pipeline YAML (nemojax sdg run)
      overrides: []                key=value overrides; placeholders below are filled in
    judge:                         what picks the SDG data (nemojax.align.judge)
      kind: verifier               verifier = the SDG config's program verifier (the oracle); reward_model =
                                   a reward model trained in the loop each iteration (stage `stage`, from
                                   `init`) on the world's scored responses, filtering through `sdg_config`;
                                   the oracle then only measures it (summary: iteration's judge_audit)
      stage: ""                    reward_model: the stage (under stages:) that trains it
      init: base                   reward_model: base = the iteration's base (as Nemotron-4-340B-Reward
                                   started from the base model) | generator = the iteration's generator
      sdg_config: ""               reward_model: the SDG pipeline YAML that filters with {reward_model}
      sdg_overrides: []            reward_model: extra overrides of that pipeline
    controls: []                   control arms run beside every iteration (nemojax.align.controls), each
                                   evaluated like a stage: seed_only (the iteration's base with the
                                   generator's seed-only stages), random_gold (the iteration's base on the
                                   seed conversations plus as many gold answers to random prompts of the
                                   same pool as the SDG kept), generator_base (the generator's own base on the
                                   iteration's SDG data), same_base (iterations 2+ on iteration 1's base)
    control_stages: []             the stages a control aligns with ([] = the iteration's stages; seed_only
                                   always uses generator.stages)
    eval:                          run after every stage (and on the generator and the bases)
      suites: {tasks: "{world}/eval/tasks.jsonl"}   suite -> file (nemojax eval); the first is the headline
      max_tokens: 96
      batch_slots: 32
      max_len: 256
      limit: 0

Placeholders in overrides and suite paths: {run_dir}, {world}, {iteration} (1, 2, ...),
{iter_dir} ({run_dir}/iter_<k>), {sdg} (the iteration's SDG run dir), {generator} (the
checkpoint that generates this iteration's data), {seed}, {tokenizer}, {reward_model} (the
iteration's reward-model judge).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemojax import config as _nc
from nemojax.config import ConfigError


@dataclass
class WorldConfig:
    enabled: bool = False
    spec: dict[str, Any] = field(default_factory=dict)


@dataclass
class BaseConfig:
    checkpoint: str = ""
    config: str = ""
    init_from: str = ""
    overrides: list[str] = field(default_factory=list)


@dataclass
class GeneratorConfig:
    checkpoint: str = ""
    base: str = ""
    stages: list[str] = field(default_factory=list)


@dataclass
class IterationConfig:
    base: str = ""
    stages: list[str] = field(default_factory=list)
    sdg_overrides: list[str] = field(default_factory=list)


@dataclass
class StageConfig:
    config: str = ""
    overrides: list[str] = field(default_factory=list)


@dataclass
class SDGConfig:
    config: str = ""
    overrides: list[str] = field(default_factory=list)


JUDGES = ("verifier", "reward_model")
JUDGE_INITS = ("base", "generator")
CONTROLS = ("seed_only", "random_gold", "generator_base", "same_base")


@dataclass
class JudgeConfig:
    kind: str = "verifier"
    stage: str = ""
    init: str = "base"
    sdg_config: str = ""
    sdg_overrides: list[str] = field(default_factory=list)


@dataclass
class EvalConfig:
    suites: dict[str, str] = field(default_factory=dict)
    max_tokens: int = 96
    batch_slots: int = 32
    max_len: int = 256
    limit: int = 0


@dataclass
class AlignConfig:
    run_dir: str = "runs/align"
    seed: int = 0
    tokenizer: str = ""
    leak_audit: str = "fail"
    world: WorldConfig = field(default_factory=WorldConfig)
    bases: dict[str, BaseConfig] = field(default_factory=dict)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    iterations: list[IterationConfig] = field(default_factory=list)
    pipeline: list[str] = field(default_factory=lambda: ["code_sft", "general_sft", "dpo", "rpo"])
    stages: dict[str, StageConfig] = field(default_factory=dict)
    sdg: SDGConfig = field(default_factory=SDGConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    controls: list[str] = field(default_factory=list)
    control_stages: list[str] = field(default_factory=list)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        if self.leak_audit not in ("fail", "warn", "off"):
            raise ConfigError(f"leak_audit={self.leak_audit!r}: choose fail, warn or off")
        if not self.iterations:
            raise ConfigError("iterations is empty: list at least one {base: NAME}")
        for name, b in self.bases.items():
            if bool(b.checkpoint) == bool(b.config):
                raise ConfigError(f"bases.{name}: give exactly one of checkpoint (an existing model) or config "
                                  f"(a pretraining config to run)")
            if b.init_from and b.init_from not in self.bases:
                raise ConfigError(f"bases.{name}.init_from={b.init_from!r} names no base; bases: {', '.join(self.bases)}")
            if b.init_from == name:
                raise ConfigError(f"bases.{name}.init_from names itself")
        g = self.generator
        if bool(g.checkpoint) == bool(g.base):
            raise ConfigError("generator: give exactly one of checkpoint (an aligned model) or base (+ stages)")
        if g.base and g.base not in self.bases:
            raise ConfigError(f"generator.base={g.base!r} names no base; bases: {', '.join(self.bases) or 'none'}")
        if self.world.enabled:
            from nemojax.align.toy_world import ToyWorldSpec
            pools = self.world.spec.get("pools", ToyWorldSpec.pools)
            if not isinstance(pools, int) or pools < len(self.iterations):
                raise ConfigError(f"world.spec.pools={pools!r} but there are {len(self.iterations)} iterations: "
                                  f"iteration k's SDG reads the world's prompts/pool_k.jsonl; set world.spec.pools: "
                                  f"{len(self.iterations)}")
        for i, it in enumerate(self.iterations):
            if it.base not in self.bases:
                raise ConfigError(f"iterations[{i}].base={it.base!r} names no base; bases: {', '.join(self.bases) or 'none'}")
        j = self.judge
        if j.kind not in JUDGES:
            raise ConfigError(f"judge.kind={j.kind!r}: choose one of {', '.join(JUDGES)}")
        if j.kind == "reward_model":
            if not j.stage or not j.sdg_config:
                raise ConfigError("judge.kind=reward_model needs judge.stage (the stage training the reward model) "
                                  "and judge.sdg_config (the SDG pipeline filtering with it)")
            if j.init not in JUDGE_INITS:
                raise ConfigError(f"judge.init={j.init!r}: choose one of {', '.join(JUDGE_INITS)}")
        unknown = [c for c in self.controls if c not in CONTROLS]
        if unknown:
            raise ConfigError(f"controls: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(CONTROLS)}")
        if "seed_only" in self.controls and not g.stages:
            raise ConfigError("controls: seed_only aligns the iteration's base with generator.stages, which is empty; "
                              "a generator given as a checkpoint needs the stages that made it beside it, e.g. "
                              "generator={checkpoint: ..., stages: [seed_sft]}")
        used = set(g.stages) | set(self.pipeline) | {s for it in self.iterations for s in it.stages}
        used |= set(self.control_stages) | ({j.stage} if j.kind == "reward_model" else set())
        for name in sorted(used):
            if name not in self.stages:
                raise ConfigError(f"stage {name!r} is used but not defined under stages:; defined: "
                                  f"{', '.join(self.stages) or 'none'}")
            if not self.stages[name].config:
                raise ConfigError(f"stages.{name}.config is empty: give a training config (e.g. configs/dpo.yaml)")
        if not self.sdg.config:
            raise ConfigError("sdg.config is empty: give the SDG pipeline YAML each iteration runs")
        if not self.eval.suites:
            raise ConfigError("eval.suites is empty: e.g. {tasks: '{world}/eval/tasks.jsonl'}")
        if self.eval.max_tokens < 1 or self.eval.batch_slots < 1 or self.eval.max_len < 2:
            raise ConfigError("eval: max_tokens, batch_slots must be >= 1 and max_len >= 2")


def load_align_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> AlignConfig:
    """Load the YAML (with `base:` inheritance), apply key=value overrides, validate."""
    tree = _nc._read_yaml(_nc.resolve_path(path))
    for item in overrides:
        _nc._apply_override(tree, item)
    cfg = _nc._build(AlignConfig, tree)
    # dict-of-section keys: build each entry (the generic builder keeps mappings as they are)
    cfg.bases = {k: _nc._build(BaseConfig, v or {}, f"bases.{k}") for k, v in cfg.bases.items()}
    cfg.stages = {k: _nc._build(StageConfig, v or {}, f"stages.{k}") for k, v in cfg.stages.items()}
    cfg.validate()
    return cfg
