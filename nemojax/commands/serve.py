"""`nemojax serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the sampling engine.

    nemojax serve --checkpoint runs/tiny --port 8000
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}'

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions
(`stream: true` for server-sent events). One background thread owns the engine; concurrent
requests share its decode batches (continuous batching over --batch-slots slots).

With the `openai` client:

    from openai import OpenAI
    client = OpenAI(base_url="http://localhost:8000/v1", api_key="unused")
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}])
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nemojax.inference import Engine


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="nemojax checkpoint (dir, run dir or step dir) or Hugging Face Nemotron dir")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None,
                   help="the model id clients send and /v1/models lists (default: the checkpoint "
                        "directory's name)")
    p.add_argument("--tokenizer", default=None,
                   help="'builtin', a SentencePiece .model, or a dir holding tokenizer.model "
                        "(default: the checkpoint's tokenizer.model if it has one, else builtin)")
    p.add_argument("--batch-slots", type=int, default=8, help="samples decoded together")
    p.add_argument("--max-len", type=int, default=None,
                   help="prompt + completion tokens per sample (default: the model's max_seq_len)")
    p.add_argument("--decode-steps", type=int, default=8,
                   help="tokens per slot per host round-trip (also the streaming granularity)")
    p.add_argument("--max-prefill-batch", type=int, default=8, help="prompts prefilled together")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute (and weight) dtype instead of the checkpoint's")
    p.add_argument("--no-bos", action="store_true", help="do not prepend bos to text and chat prompts")
    p.add_argument("--seed", type=int, default=0, help="seeds requests that do not give one")
    p.add_argument("--warmup", choices=["none", "min", "full"], default="min",
                   help="compile before accepting traffic: min = the smallest prefill bucket and decode "
                        "window; full = every prompt-length bucket and every decode window up to "
                        "--max-len (slow for big models, but no request then waits for a compile; "
                        "prefills of several prompts at once may still compile on first use)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def warm_up(engine: "Engine", *, full: bool, token: int = 2) -> None:
    """Compile (or load from the program cache) the engine's programs before the first user waits.

    `full` covers every prompt-chunk shape and attention window (slow for big models the first
    time, then loaded from disk); otherwise the smallest shapes only. `token` is unused (kept for
    callers of the earlier signature).
    """
    engine.warm_up(full=full)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from nemojax.serve.app import create_app
    except ModuleNotFoundError as e:
        print(f"nemojax serve: {e.name} is missing; install the serve extra: pip install 'nemojax[serve]'",
              file=sys.stderr)
        return 2
    from nemojax.checkpoint import load_model
    from nemojax.commands.train import enable_compile_cache
    from nemojax.data.tokenizer import TokenizerError, load_tokenizer
    from nemojax.inference import Engine

    log = logging.getLogger("nemojax")  # ours only: the root logger would echo JAX's chatter
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        log.addHandler(handler)
    log.setLevel(args.log_level.upper())
    enable_compile_cache()  # a restarted server then warms up from disk, not from XLA
    ckpt = Path(args.checkpoint)
    tok_spec = args.tokenizer
    if tok_spec is None:
        tok_spec = str(ckpt / "tokenizer.model") if (ckpt / "tokenizer.model").is_file() else "builtin"
    try:
        tokenizer = load_tokenizer(tok_spec)
    except TokenizerError as e:
        print(f"nemojax serve: {e}", file=sys.stderr)
        return 2
    dtype_kw = {} if args.dtype is None else {"param_dtype": args.dtype, "compute_dtype": args.dtype}
    try:
        model = load_model(args.checkpoint, **dtype_kw)
    except FileNotFoundError as e:  # the messages say what to pass instead
        print(f"nemojax serve: {e}", file=sys.stderr)
        return 2
    cfg = model.cfg
    if tokenizer.vocab_size > cfg.vocab_size:
        log.warning("tokenizer %s has %d pieces but the model only %d; pass the checkpoint's own --tokenizer",
                    tok_spec, tokenizer.vocab_size, cfg.vocab_size)
    try:
        engine = Engine(model, max_slots=args.batch_slots, max_len=args.max_len, decode_steps=args.decode_steps,
                        max_prefill_batch=args.max_prefill_batch, tokenizer=tokenizer,
                        stop_token_ids=sorted({cfg.eos_id, tokenizer.eos_id}), seed=args.seed)
    except ValueError as e:
        print(f"nemojax serve: {e}", file=sys.stderr)
        return 2
    if args.warmup != "none":
        t0 = time.perf_counter()
        warm_up(engine, full=args.warmup == "full", token=cfg.bos_id)
        log.info("warm-up (%s) took %.1f s", args.warmup, time.perf_counter() - t0)
    name = args.model_name or (ckpt.resolve().name or "nemojax")
    app = create_app(engine, tokenizer, model_name=name, bos=not args.no_bos)
    log.info("serving %r (context %d tokens, %d slots) on http://%s:%d", name, engine.max_len,
             engine.max_slots, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
