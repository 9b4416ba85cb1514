"""`nemojax serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the sampling engine.

    nemojax serve --checkpoint runs/tiny --port 8000 [--api-key KEY] [--reward-checkpoint runs/rm]
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}'

Endpoints: POST /v1/completions, POST /v1/chat/completions (`stream: true`: server-sent events,
one chunk per token), GET /v1/models, POST /tokenize, POST /detokenize, GET /version,
GET /health, GET /metrics (Prometheus). With a reward model (--reward-checkpoint, or a reward
checkpoint as --checkpoint): POST /v1/reward, and chat completions with the reward model's name
answer in NVIDIA's reward API shape. One background thread owns the engine; concurrent requests
share its decode batches (continuous batching over --batch-slots slots).

Operations: --api-key (or $NEMOJAX_API_KEY) guards every route but /health, /metrics and
/version; a body over --max-body-mb gets 413 at once; at most --batch-slots + --max-queue
samples (and reward conversations) are accepted at once (then 429 with Retry-After, also for a
stream, before its 200); a request running longer than --request-timeout is cancelled (504); a
client that disconnects frees its slots. The port is checked (and held) before the model loads.
SIGTERM (or Ctrl-C) stops accepting connections, lets requests in flight finish for up to
--drain-timeout seconds, then exits 0.

With the `openai` client:

    from openai import OpenAI
    client = OpenAI(base_url="http://localhost:8000/v1", api_key="unused")
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}])
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nemojax.inference import Engine

API_KEY_ENV = "NEMOJAX_API_KEY"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from nemojax.inference.setup import HelpFormatter, add_engine_arguments

    p.description = __doc__
    p.formatter_class = HelpFormatter
    p.add_argument("--checkpoint", required=True,
                   help="nemojax checkpoint (dir, run dir or step dir) or Hugging Face Nemotron dir; a reward "
                        "checkpoint serves reward scoring only")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--model-name", default=None,
                   help="the model id clients send and /v1/models lists (default: the checkpoint directory's name)")
    p.add_argument("--tokenizer", default=None,
                   help="'builtin', a SentencePiece .model, or a dir holding tokenizer.model "
                        "(default: the checkpoint's tokenizer.model if it has one, else builtin)")
    p.add_argument("--no-bos", action="store_true", help="do not prepend bos to text and chat prompts")
    p.add_argument("--seed", type=int, default=0, help="seeds requests that do not give one")
    add_engine_arguments(p, slots=8, decode_steps=8)
    p.add_argument("--warmup", choices=["none", "min", "full"], default="min",
                   help="compile (or load from the program cache) before accepting traffic: min = the smallest "
                        "prompt and decode shapes (others compile on first use); full = a prefill program for "
                        "every batch and chunk the scheduler can form, every decode window with and without "
                        "sampling and top log-probs, prompt log-prob prefills; a prefill window not among them "
                        "then runs at a wider compiled one, so no request ever waits for a compile (slow the "
                        "first time for big models; later starts load the programs from --compile-cache)")
    g = p.add_argument_group("operations")
    g.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer <key>' on every route but /health, /metrics and "
                        f"/version (default: ${API_KEY_ENV} if set, else no key)")
    g.add_argument("--max-queue", type=int, default=64,
                   help="samples (and reward conversations) accepted beyond the slots before requests get 429 "
                        "(Retry-After); -1 = unbounded")
    g.add_argument("--max-body-mb", type=float, default=4.0,
                   help="largest request body in MiB; a larger one gets 413 before it is read (0 = no limit)")
    g.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may take before it is cancelled (504); 0 = no limit")
    g.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds in-flight requests get to finish before the server exits")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="server and access log verbosity")
    r = p.add_argument_group("reward model")
    r.add_argument("--reward-checkpoint", default=None,
                   help="a reward-model checkpoint to serve beside the generator (POST /v1/reward, and chat "
                        "completions with --reward-model-name)")
    r.add_argument("--reward-model-name", default=None,
                   help="its model id (default: the reward checkpoint directory's name)")
    r.add_argument("--reward-batch-size", type=int, default=8, help="conversations scored per forward pass")
    r.add_argument("--reward-max-len", type=int, default=None,
                   help="tokens per scored conversation (default: the reward model's max_seq_len)")


def warm_up(engine: "Engine", *, full: bool, token: int = 2) -> None:
    """Compile (or load from the program cache) the engine's programs before the first user waits.

    `full` covers every prompt-chunk shape and attention window (slow for big models the first
    time, then loaded from disk); otherwise the smallest shapes only. `token` is unused (kept for
    callers of the earlier signature).
    """
    engine.warm_up(full=full)


def _logger(level: str) -> logging.Logger:
    """The `nemojax` logger with one handler of its own. It does not propagate: a handler on the
    root logger (some libraries install one) would print every line a second time."""
    log = logging.getLogger("nemojax")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        log.addHandler(handler)
    log.propagate = False
    log.setLevel(level.upper())
    return log


def _load_reward(path: str, args: argparse.Namespace, tokenizer: Any) -> Any:
    from nemojax.inference.reward import RewardScorer

    return RewardScorer.from_checkpoint(path, tokenizer=tokenizer, batch_size=args.reward_batch_size,
                                        max_len=args.reward_max_len, dtype=args.dtype)


def bind_port(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound now (before the model loads, which can take
    minutes) so a busy port is reported at once and nothing can take the port meanwhile.
    OSError when it cannot be bound."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn  # noqa: F401  (the serve extra: checked before anything is loaded)

        from nemojax.serve.app import create_app  # noqa: F401
    except ModuleNotFoundError as e:
        print(f"nemojax serve: {e.name} is missing; install the serve extra: pip install 'nemojax[serve]'",
              file=sys.stderr)
        return 2

    def fail(message: str) -> int:
        print(f"nemojax serve: {message}", file=sys.stderr)
        return 2

    log = _logger(args.log_level)
    if args.max_body_mb < 0:
        return fail(f"--max-body-mb must be >= 0 (0 = no limit), got {args.max_body_mb}")
    if not Path(args.checkpoint).exists():  # a typo is reported before anything else
        return fail(f"checkpoint not found: {args.checkpoint} (give a nemojax checkpoint, a training run "
                    f"directory, a step directory or a Hugging Face Nemotron directory)")
    try:
        listener = bind_port(args.host, args.port)
    except OSError as e:
        why = "is already in use" if e.errno == errno.EADDRINUSE else f"cannot be used ({e.strerror or e})"
        return fail(f"port {args.port} on {args.host} {why}; stop what holds it or pick another --port")
    try:
        return _serve(args, listener, log, fail)
    finally:
        listener.close()


def _serve(args: argparse.Namespace, listener: socket.socket, log: logging.Logger, fail: Any) -> int:
    """Load, warm up and serve on `listener` until a signal; the exit code."""
    import uvicorn

    from nemojax.serve.app import create_app
    from nemojax.inference.setup import SetupError, enable_compile_cache, engine_from_args, load_for_sampling

    enable_compile_cache(args.compile_cache)  # a restarted server loads its programs from disk
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    ckpt = Path(args.checkpoint)
    engine = reward = None
    try:
        model, tokenizer = load_for_sampling(args.checkpoint, args.tokenizer, args.dtype, args.quantize,
                                             args.quant_block_size)
    except SetupError as e:
        if "not a language model" not in str(e):
            return fail(str(e))
        model = None  # a reward checkpoint: serve scoring only
    try:
        if model is not None:
            if tokenizer.vocab_size > model.cfg.vocab_size:
                log.warning("the tokenizer has %d pieces but the model only %d; pass the checkpoint's own "
                            "--tokenizer", tokenizer.vocab_size, model.cfg.vocab_size)
            engine = engine_from_args(model, tokenizer, args, seed=args.seed)
            del model
        reward_path = args.reward_checkpoint or (args.checkpoint if engine is None else None)
        if reward_path is not None:
            if not Path(reward_path).exists():
                return fail(f"reward checkpoint not found: {reward_path}")
            from nemojax.inference.setup import resolve_tokenizer_spec
            from nemojax.data.tokenizer import load_tokenizer

            reward_tok = load_tokenizer(resolve_tokenizer_spec(args.tokenizer, reward_path))
            if engine is None:
                tokenizer = reward_tok
            reward = _load_reward(reward_path, args, reward_tok)
    except SetupError as e:
        return fail(str(e))
    except (FileNotFoundError, ValueError) as e:
        return fail(str(e).replace("\n", " "))
    if engine is not None and args.warmup != "none":
        t0 = time.perf_counter()
        stats = engine.warm_up(full=args.warmup == "full")
        log.info("warm-up (%s): %d programs compiled, %d loaded from the cache, %.1f s", args.warmup,
                 stats["compiled"], stats["loaded"], time.perf_counter() - t0)
    name = args.model_name or (ckpt.resolve().name or "nemojax")
    reward_name = None
    if reward is not None:
        reward_name = args.reward_model_name or (name if engine is None else Path(args.reward_checkpoint).resolve().name)
    app = create_app(engine, tokenizer, model_name=name, bos=not args.no_bos, api_key=api_key,
                     max_queue=None if args.max_queue < 0 else args.max_queue,
                     request_timeout=args.request_timeout or None, reward=reward, reward_model_name=reward_name,
                     max_body_bytes=int(args.max_body_mb * 2**20) or None)
    server_state = app.state.server
    what = f"{name!r} (context {engine.max_len} tokens, {engine.max_slots} slots)" if engine is not None else ""
    if reward is not None:
        what += (" and " if what else "") + f"reward model {reward_name!r}"
    log.info("serving %s on http://%s:%d%s", what, args.host, args.port, " (API key required)" if api_key else "")

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not server_state.draining:
                server_state.draining = True
                log.info("signal %d: draining (up to %.0f s for requests in flight), then exiting", sig,
                         args.drain_timeout)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.drain_timeout)
    # uvicorn re-raises the signal it stopped for once it is done; with this handler in place
    # that is a no-op, so a drained server exits 0 instead of dying by SIGTERM.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        Server(config).run(sockets=[listener])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("stopped")
    return 0
