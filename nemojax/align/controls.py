"""Control arms of `nemojax align` (config `controls`): what separates the flywheel's effect from
its confounds.

An iteration's student differs from its generator in three ways at once: a stronger base, more
data (the seed conversations plus the generator's verified answers) and the generator's choice
of which prompts get answered. Each control changes one of them, on the same world, bases and
evaluation, and is evaluated like a stage, so that every comparison is paired per task:

    seed_only       the iteration's base with the generator's own seed-only stages (generator.stages):
                    student - seed_only = what the synthetic data adds on the student's base;
                    seed_only - generator = what the stronger base alone gives
    random_gold     the iteration's base on the seed conversations plus as many gold (reference)
                    answers to prompts drawn at random from the same deduplicated, decontaminated pool
                    as the SDG step kept (and as many preference pairs, gold against a wrong answer):
                    student - random_gold = the generator's selection against an oracle annotator
                    answering random prompts
    generator_base  the base the iteration's generator was aligned from, on the iteration's SDG data:
                    generator_base - generator = whether the synthetic data lifts the generator's own
                    base (a student beating its teacher without a stronger base)
    same_base       iterations 2+ on iteration 1's base (its own chain of generators from iteration 3):
                    student - same_base = what switching to the stronger base adds

Controls align with `control_stages` (default: the iteration's stages). Two arms that would
train the same base with the same stages on the same data (generator_base and same_base in
iteration 2) are trained once (`same_as`). Every arm lives in `<run_dir>/controls/<arm>/iter_<k>/`.
"""

from __future__ import annotations

import collections
import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nemojax.align.config import IterationConfig
    from nemojax.align.loop import AlignLoop

RANDOM_GOLD_VERSION = 1  # bumped when the same inputs give other random-gold data


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def random_gold_data(sdg_dir: Path, out_dir: Path, seed: int) -> dict[str, Any]:
    """Write the random-gold control's sft.jsonl, code_sft.jsonl and preference.jsonl into out_dir,
    matched in size to what the SDG step in sdg_dir wrote (after its leak removal), and return the
    counts. The SDG run's files read: prompts.jsonl (the deduplicated, decontaminated pool, serialised
    tasks), seeds.jsonl / code_seeds.jsonl (the seed conversations it merged in) and sft.jsonl,
    code_sft.jsonl, preference.jsonl (what the iteration trains on)."""
    from nemojax.align.tasks import Task
    from nemojax.align.toy_world import chat_record, wrong_answer

    need = ("prompts", "seeds", "code_seeds", "sft", "code_sft", "preference")
    missing = [f"{n}.jsonl" for n in need if not (sdg_dir / f"{n}.jsonl").is_file()]
    if missing:
        raise FileNotFoundError(f"random_gold control: the SDG run {sdg_dir} has no {', '.join(missing)}")
    files = {n: _read_jsonl(sdg_dir / f"{n}.jsonl") for n in need}
    pool = [Task.from_json(r) for r in files["prompts"]]
    n_sft = sum(r.get("merged_from") != "seeds" for r in files["sft"])
    n_pairs = len(files["preference"])
    if max(n_sft, n_pairs) > len(pool):
        raise ValueError(f"random_gold control: {max(n_sft, n_pairs)} gold answers asked of a pool of {len(pool)}")
    rng = random.Random(f"random_gold/{seed}")
    picked = rng.sample(pool, n_sft)
    paired = rng.sample(pool, n_pairs)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out_dir / "sft.jsonl", files["seeds"] + [chat_record(t) for t in picked])
    _write_jsonl(out_dir / "code_sft.jsonl", files["code_seeds"] + [chat_record(t) for t in picked if t.family == "code"])
    _write_jsonl(out_dir / "preference.jsonl", [
        {"prompt": t.prompt, "chosen": t.answer, "rejected": wrong_answer(t, rng), "chosen_reward": 1.0,
         "rejected_reward": 0.0} for t in paired])
    by_prompt = {t.prompt: t.family for t in pool}
    flywheel = collections.Counter(by_prompt.get(r["messages"][0]["content"], "?") for r in files["sft"]
                                   if r.get("merged_from") != "seeds")  # the SDG merge marks each record's source
    return {"gold_answers": n_sft, "pairs": n_pairs, "pool": len(pool),
            "gold_by_family": dict(sorted(collections.Counter(t.family for t in picked).items())),
            "flywheel_by_family": dict(sorted(flywheel.items()))}


class Controls:
    """Runs the configured control arms after each iteration (module docstring)."""

    def __init__(self, loop: "AlignLoop", bases: dict[str, dict[str, Any]]) -> None:
        self.loop = loop
        self.bases = bases
        self.trained: dict[str, tuple[str, dict[str, Any]]] = {}  # setup -> (arm, record)
        self.same_base_gen: dict[str, Any] | None = None  # same_base's generator for the next iteration
        self.same_base_own = False  # whether that generator is the arm's own (not the main student)
        self.judge: dict[str, Any] | None = None

    def run(self, k: int, it: "IterationConfig", sdg: dict[str, Any], main: list[dict[str, Any]],
            fill: dict[str, Any], judge: dict[str, Any] | None = None) -> dict[str, Any]:
        """The arms of iteration k (`sdg`: its SDG step, `main`: its stages, `judge`: its reward-model
        judge, which a control generating its own data uses too)."""
        self.judge = judge
        out = {name: getattr(self, name)(k, it, sdg, fill) for name in self.loop.cfg.controls}
        if "same_base" in self.loop.cfg.controls and not (out["same_base"].get("stages")):
            self.same_base_gen, self.same_base_own = (main[-1] if main else None), False
        return out

    def _arm(self, arm: str, k: int, base: str, stages: list[str], inputs: tuple[str, ...],
             fill: dict[str, Any], data_key: str, **extra: Any) -> dict[str, Any]:
        """Align `base` with `stages` on `data_key` (the directory its files are in, or "seeds"; `inputs`:
        that data's fingerprints), once per setup: the same setup in another arm or iteration is
        the same model (`same_as`)."""
        loop = self.loop
        setup = json.dumps([base, stages, inputs, data_key])
        if setup in self.trained:
            other, rec = self.trained[setup]
            return {**rec, **extra, "same_as": other}
        start = loop.base_checkpoint(base, self.bases)
        recs = loop._stages(f"control {arm} {k}", stages, start, loop.run_dir / "controls" / arm / f"iter_{k}",
                            loop.architecture(base), inputs=inputs, **fill)
        rec = {"base": base, "stages": recs, **extra}
        self.trained[setup] = (f"{arm}, iteration {k}", rec)
        return rec

    def _control_stages(self, it: "IterationConfig") -> list[str]:
        cfg = self.loop.cfg
        return list(cfg.control_stages or it.stages or cfg.pipeline)

    def seed_only(self, k: int, it: "IterationConfig", sdg: dict[str, Any], fill: dict[str, Any]) -> dict[str, Any]:
        return self._arm("seed_only", k, it.base, list(self.loop.cfg.generator.stages), (), fill, "seeds")

    def random_gold(self, k: int, it: "IterationConfig", sdg: dict[str, Any], fill: dict[str, Any]) -> dict[str, Any]:
        loop = self.loop
        data_dir = loop.run_dir / "controls" / "random_gold" / f"iter_{k}" / "data"
        seed = loop.cfg.seed * 1000 + k
        label = f"control random_gold {k} data"
        train_fp = _fingerprint({"sdg": sdg["fingerprint"]["train"], "seed": seed, "version": RANDOM_GOLD_VERSION})
        done = loop._check(label, data_dir, train_fp, None)
        if loop._dry:
            data = done or {"step": label, "fingerprint": {"train": train_fp}}
        elif done is not None:
            data = done
        else:
            loop._start(data_dir, train_fp)
            data = {"step": label, "counts": random_gold_data(Path(fill["sdg"]), data_dir, seed),
                    "fingerprint": {"train": train_fp}}
            _write_json(data_dir / "step.json", data)
            loop.log(f"[align] {label}: {json.dumps(data['counts'])}")
        return self._arm("random_gold", k, it.base, self._control_stages(it), (train_fp,),
                         {**fill, "sdg": str(data_dir)}, str(data_dir), data=data)

    def generator_base(self, k: int, it: "IterationConfig", sdg: dict[str, Any], fill: dict[str, Any]
                       ) -> dict[str, Any]:
        cfg = self.loop.cfg
        base = cfg.generator.base if k == 1 else cfg.iterations[k - 2].base
        if not base:
            return {"skipped": "the generator is an existing checkpoint: its base is not known"}
        if base == it.base:
            return {"skipped": f"iteration {k}'s generator was aligned from {base}, this iteration's own base"}
        return self._arm("generator_base", k, base, self._control_stages(it), (sdg["fingerprint"]["train"],), fill,
                         fill["sdg"])

    def same_base(self, k: int, it: "IterationConfig", sdg: dict[str, Any], fill: dict[str, Any]) -> dict[str, Any]:
        loop, cfg = self.loop, self.loop.cfg
        first = cfg.iterations[0].base
        if k == 1 or it.base == first:
            return {"skipped": f"iteration {k} aligns {it.base}, iteration 1's base, already"}
        if not self.same_base_own:  # the arm's generator is the main student: the main SDG data is its data
            data, arm_fill = sdg, fill
        else:
            gen = self.same_base_gen or {}
            sdg_dir = loop.run_dir / "controls" / "same_base" / f"iter_{k}" / "sdg"
            arm_fill = {**fill, "sdg": str(sdg_dir), "generator": gen["checkpoint"]}
            data = loop._sdg(k, it.sdg_overrides, gen, self._control_stages(it), loop.architecture(first),
                             label=f"control same_base {k} SDG", judge=self.judge, **arm_fill)
        rec = self._arm("same_base", k, first, self._control_stages(it), (data["fingerprint"]["train"],), arm_fill,
                        arm_fill["sdg"], **({"sdg": data} if self.same_base_own else {}))
        self.same_base_gen, self.same_base_own = (rec["stages"][-1] if rec["stages"] else None), True
        return rec


def _fingerprint(obj: Any) -> str:
    from nemojax.align.loop import fingerprint

    return fingerprint(obj)


def _write_json(path: Path, obj: Any) -> None:
    from nemojax.align.loop import _write_json as write

    write(path, obj)
