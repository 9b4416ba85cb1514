"""SDG against the real in-process engine (a random tiny model): the client keeps the slots full
and returns exactly what the engine returns for the same requests; the example pipeline
configs/sdg/tiny.yaml runs end to end through `nemojax sdg run`, reusing one engine across
stages without recompiling, with an in-process reward model as judge, and writes SFT and
preference files that the post-training loaders accept."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

from nemojax.checkpoint import save_model
from nemojax.cli import main
from nemojax.config import ModelConfig, RewardConfig
from nemojax.data.chat import prompt_ids
from nemojax.data.tokenizer import load_tokenizer
from nemojax.inference import Engine, Request, SamplingParams
from nemojax.model.transformer import init_model
from nemojax.sdg.engine_client import EngineLLM
from nemojax.sdg.llm import GenRequest

CFG = ModelConfig(vocab_size=4096, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                  ffn_hidden_size=128, init_std=0.2, max_seq_len=512)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdg_models")
    save_model(init_model(CFG, seed=0), CFG, root / "lm")
    from nemojax.model.reward import make_model

    rcfg = dataclasses.replace(CFG, reward=RewardConfig(enabled=True), init_std=0.05)
    save_model(make_model(rcfg, seed=3), rcfg, root / "rm")
    return root / "lm", root / "rm"


def test_engine_client_fills_slots_and_matches_the_engine(ckpts, tok):
    from nemojax.checkpoint import load_model

    model = load_model(str(ckpts[0]))
    engine = Engine(model, max_slots=4, max_len=128, decode_steps=4, max_prefill_batch=4, min_bucket=128,
                    tokenizer=tok, stop_token_ids=[3], program_dir=False)
    llm = EngineLLM(engine, tok)
    outstanding = {"now": 0, "at_steps": []}
    submit, step = engine.submit, engine.step

    def counting_submit(req):
        outstanding["now"] += req.params.n
        submit(req)

    def counting_step():
        outstanding["at_steps"].append(outstanding["now"])
        done = step()
        outstanding["now"] -= len(done)
        return done
    engine.submit, engine.step = counting_submit, counting_step

    def req(i, turn):
        return GenRequest(messages=[{"role": "user", "content": f"Question number {i}, turn {turn}?"}],
                          temperature=0.7, max_tokens=6, seed=100 * i + turn)

    async def item(i):  # two dependent calls per item, as stages make them
        a = await llm.generate(req(i, 0))
        b = await llm.generate(req(i, 1))
        return a.text, b.text

    async def go():
        return await asyncio.gather(*(item(i) for i in range(8)))
    got = asyncio.run(go())
    steps = outstanding["at_steps"]
    assert max(steps) >= 4
    # every chunk but the tail ran with all 4 slots busy: a finished item's next request was
    # queued before the following chunk (16 requests x 6 tokens / (4 slots x 4 tokens) ~ 6-12 chunks)
    assert sum(s >= 4 for s in steps) >= len(steps) - 3 and len(steps) <= 16
    # the same requests straight through the engine give the same texts
    engine.submit, engine.step = submit, step
    want = engine.generate_all([Request((i, t), prompt_ids(tok, req(i, t).messages),
                                        SamplingParams(temperature=0.7, max_tokens=6, seed=100 * i + t,
                                                       stop_token_ids=[tok.special_id("<extra_id_1>")]))
                                for i in range(8) for t in (0, 1)])
    texts = {c.request_id: c.text for c in want}
    assert [g for pair in got for g in pair] == [texts[(i, t)] for i in range(8) for t in (0, 1)]


def test_example_pipeline_end_to_end_on_the_tiny_engine(ckpts, tmp_path, capsys):
    lm, rm = ckpts
    run_dir = tmp_path / "run"
    overrides = [
        f"run_dir={run_dir}", f"clients.gen.checkpoint={lm}", "clients.gen.max_len=256", "clients.gen.min_bucket=256",
        "clients.gen.max_slots=8", "max_in_flight=16",
        # smaller than the example's sizes: the random model writes junk up to max_tokens
        "stages.topics.n=3", "stages.subtopics.limit=2", "stages.open_qa.limit=2", "stages.writing.limit=1",
        "stages.math_problems.limit=1", "stages.python_problems.limit=1", "stages.seed_prompts.limit=4", "stages.if_prompts.limit=4",
        "stages.answers.max_tokens=24", "stages.math_answers.max_tokens=12", "stages.dialogues.limit=2",
        "stages.dialogues.max_tokens=16", "stages.code.offspring=2", "stages.code.max_tokens=32",
        "stages.topics.max_tokens=48", "stages.subtopics.max_tokens=48", "stages.open_qa.max_tokens=48",
        "stages.writing.max_tokens=48", "stages.math_problems.max_tokens=48", "stages.python_problems.max_tokens=48",
        "stages.if_prompts.max_tokens=24",
        # the same respond stage again: it must not compile anything new
        "stages.answers_again.kind=respond", "stages.answers_again.input=if_prompts", "stages.answers_again.n=2",
        "stages.answers.n=2",
        "stages.answers_again.temperature=0.8", "stages.answers_again.max_tokens=24",
        # an in-process reward model as judge and filter
        "reward.type=engine", f"reward.checkpoint={rm}", "reward.max_len=256",
        "stages.rm_pairs.kind=preference", "stages.rm_pairs.input=answers", "stages.rm_pairs.judge=reward",
        "stages.rm_kept.kind=reward_filter", "stages.rm_kept.input=answers", "stages.rm_kept.threshold=-1000",
        "stages.rm_dpo.kind=export_preference", "stages.rm_dpo.input=rm_pairs",
    ]
    assert main(["sdg", "run", "configs/sdg/tiny.yaml", *overrides, "--no-progress"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary) == 26 + 4
    for name, s in summary.items():
        assert {"items_in", "kept", "dropped", "tokens", "seconds"} <= set(s), name
    assert summary["answers"]["kept"] == 4 and summary["answers"]["tokens"] > 0
    passing = [json.loads(l) for l in (run_dir / "if_passing.jsonl").read_text().splitlines()]
    assert summary["answers_again"]["engine_compiles"] == summary["answers"]["engine_compiles"]
    assert summary["rm_kept"]["kept"] == 8  # 4 prompts x 2 samples, all above -1000
    from nemojax.data.chat_records import load_examples

    sft, _ = load_examples(run_dir / "sft.jsonl", "sft")
    assert len(sft) == sum(len(p["responses"]) for p in passing)
    assert summary["if_passing"]["kept"] + summary["if_passing"]["dropped"].get("failed_instructions", 0) >= 4
    dialogues, _ = load_examples(run_dir / "dialogue_sft.jsonl", "sft")
    assert len(dialogues) == summary["dialogues"]["kept"]
    for d in dialogues:
        assert [m["role"] for m in d.messages] == ["user", "assistant"] * 3
    load_examples(run_dir / "code_sft.jsonl", "sft")  # whatever survived parses
    pairs, _ = load_examples(run_dir / "rm_dpo.jsonl", "preference")
    assert len(pairs) >= 1 and all(p.chosen_reward > p.rejected_reward for p in pairs)
    load_examples(run_dir / "dpo.jsonl", "preference")
    # a rerun finds every stage done and changes nothing
    before = {p.name: p.read_bytes() for p in run_dir.glob("*.jsonl")}
    assert main(["sdg", "run", "configs/sdg/tiny.yaml", *overrides, "--no-progress"]) == 0
    assert {p.name: p.read_bytes() for p in run_dir.glob("*.jsonl")} == before


def test_engine_stage_output_does_not_depend_on_concurrency(ckpts, tok, tmp_path):
    """Seeds derive from (seed, stage, item, call): one item at a time or eight at once (other
    batch neighbours, other slots) sample the same tokens. One engine serves both runs. (This
    64-wide model's matmuls do not change kernels with the row count on XLA:CPU, so its numbers
    are batch-invariant whatever the engine settings; test_sdg_determinism.py uses a model where
    they are not.)"""
    import io

    from nemojax.checkpoint import load_model
    from nemojax.sdg.config import build_pipeline
    from nemojax.sdg.runner import Runner

    engine = Engine(load_model(str(ckpts[0])), max_slots=4, max_len=128, decode_steps=4, max_prefill_batch=4,
                    min_bucket=128, tokenizer=tok, stop_token_ids=[3], program_dir=False)
    llm = EngineLLM(engine, tok)

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about topic {i}."}) + "\n" for i in range(6)))
    outs = []
    for in_flight in (1, 8):
        tree = {"run_dir": str(tmp_path / f"run{in_flight}"), "seed": 5, "progress": False,
                "max_in_flight": in_flight,
                "clients": {"gen": {"type": "engine", "checkpoint": str(ckpts[0]), "max_len": 128,
                                    "min_bucket": 128, "max_slots": 4}},
                "stages": {"prompts": {"kind": "read", "path": str(prompts)},
                           "answers": {"kind": "respond", "n": 2, "temperature": 1.0, "max_tokens": 10}}}
        Runner(build_pipeline(tree), clients={"gen": llm}, log=io.StringIO()).run()
        outs.append((tmp_path / f"run{in_flight}" / "answers.jsonl").read_text())
    assert outs[0] == outs[1]
    assert len({r["responses"][0]["messages"][-1]["content"] for r in map(json.loads, outs[0].splitlines())}) > 1
