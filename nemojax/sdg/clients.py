"""Build the pipeline's named clients from config; engines are shared per checkpoint.

Two client names pointing at the same checkpoint with the same engine settings share one
`Engine` (one set of weights, one KV cache, one set of compiled functions).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from nemojax.sdg.config import ClientConfig, PipelineConfig, RewardConfig
from nemojax.sdg.llm import LLM, ScriptedLLM


def _tokenizer(spec: str, checkpoint: str) -> Any:
    from nemojax.data.tokenizer import load_tokenizer

    if not spec:
        ckpt = Path(checkpoint)
        spec = str(ckpt / "tokenizer.model") if (ckpt / "tokenizer.model").is_file() else "builtin"
    return load_tokenizer(spec)


def make_engine(c: ClientConfig) -> tuple[Any, Any]:
    """(Engine, tokenizer) for an engine client config."""
    from nemojax.checkpoint import load_model
    from nemojax.inference import Engine

    tok = _tokenizer(c.tokenizer, c.checkpoint)
    dtype_kw = {"param_dtype": c.dtype, "compute_dtype": c.dtype} if c.dtype else {}
    model = load_model(c.checkpoint, quantize=c.quantize or None, **dtype_kw)
    if tok.vocab_size > model.cfg.vocab_size:
        print(f"nemojax sdg: warning: tokenizer has {tok.vocab_size} pieces but the model only "
              f"{model.cfg.vocab_size}", file=sys.stderr)
    max_len = min(c.max_len, model.cfg.max_seq_len)
    # batch-invariant: nothing about a request's numbers depends on its neighbours (docs/SDG.md)
    invariant = {"max_prefill_batch": 1, "prefix_cache_tokens": 0, "min_window": max_len} if c.batch_invariant \
        else {"max_prefill_batch": c.max_prefill_batch}
    engine = Engine(model, max_slots=c.max_slots, max_len=max_len, decode_steps=c.decode_steps,
                    min_bucket=c.min_bucket, tokenizer=tok, **invariant,
                    **({} if c.program_cache else {"program_dir": False}),
                    stop_token_ids=sorted({model.cfg.eos_id, tok.eos_id}))
    return engine, tok


def build_clients(cfg: PipelineConfig) -> dict[str, LLM]:
    from nemojax.sdg.engine_client import EngineLLM
    from nemojax.sdg.http_client import OpenAILLM

    engines: dict[tuple, tuple[Any, Any]] = {}
    out: dict[str, LLM] = {}
    for name, c in cfg.clients.items():
        if c.type == "scripted":
            out[name] = ScriptedLLM(rules=[(p, r) for p, r in c.rules], default=c.default, name=name,
                                    delay_s=c.delay_s)
        elif c.type == "openai":
            out[name] = OpenAILLM(c.base_url, c.model, name=name, api_key_env=c.api_key_env or None,
                                  timeout_s=c.timeout_s, max_concurrency=c.max_concurrency,
                                  max_retries=c.max_retries, seed=cfg.seed)
        else:
            key = (str(Path(c.checkpoint).resolve()), c.tokenizer, c.max_slots, c.max_len, c.decode_steps,
                   c.max_prefill_batch, c.batch_invariant, c.min_bucket, c.program_cache, c.dtype, c.quantize)
            if key not in engines:
                engines[key] = make_engine(c)
            engine, tok = engines[key]
            out[name] = EngineLLM(engine, tok, name=name)
    return out


def build_reward(r: RewardConfig, seed: int = 0) -> Any:
    from nemojax.sdg.reward import HTTPReward, InProcessReward

    weights = dict(r.weights) or None
    if r.type == "none":
        return None
    if r.type == "openai":
        return HTTPReward(r.base_url, r.model, weights=weights, api_key_env=r.api_key_env or None,
                          timeout_s=r.timeout_s, max_concurrency=r.max_concurrency, max_retries=r.max_retries,
                          seed=seed)
    return InProcessReward.from_checkpoint(r.checkpoint, tokenizer=r.tokenizer or None, batch_size=r.batch_size,
                                           max_len=r.max_len, weights=weights)
