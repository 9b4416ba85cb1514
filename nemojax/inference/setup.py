"""What `nemojax generate` and `nemojax serve` share: caches, loading, engine options.

- `enable_compile_cache()`: every compiled program persists across processes. JAX's own
  persistent cache (threshold lowered to 0 s so small programs count too) plus the engine's
  serialized programs beside it (programs.py), which skip tracing and lowering as well.
- `load_for_sampling()`: checkpoint + tokenizer, with errors a user can act on (`SetupError`,
  one line) instead of tracebacks.
- `add_engine_arguments()` / `engine_from_args()`: the engine flags, identical in both commands.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any


class SetupError(Exception):
    """A checkpoint, tokenizer or option problem; the message says what to fix."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the description's layout and shows each option's default value (unless the
    help text already explains it, or there is none: a required option, an off switch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if ("default" in text or action.required or d is None or d is False or d == [] or d == argparse.SUPPRESS
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def cache_root() -> Path:
    return Path(os.environ.get("NEMOJAX_CACHE_DIR") or Path.home() / ".cache" / "nemojax")


def enable_compile_cache(directory: str | Path | None = None) -> str:
    """Persist every compiled program (returns the directory used).

    JAX_COMPILATION_CACHE_DIR, or a cache directory configured earlier in this process, wins;
    else `directory`, else $NEMOJAX_CACHE_DIR/jax_compile (default ~/.cache/nemojax/jax_compile).
    """
    import jax

    current = os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir
    path = str(current or directory or cache_root() / "jax_compile")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def resolve_tokenizer_spec(spec: str | None, checkpoint: str | Path) -> str:
    """The checkpoint's own tokenizer.model when it has one and none is given, else builtin."""
    if spec is not None:
        return spec
    ckpt = Path(checkpoint)
    return str(ckpt / "tokenizer.model") if (ckpt / "tokenizer.model").is_file() else "builtin"


def load_for_sampling(checkpoint: str | Path, tokenizer: str | None = None, dtype: str | None = None,
                      quantize: str | None = None, quant_block_size: int = 0) -> tuple[Any, Any]:
    """(model, tokenizer) for the engine; SetupError with a one-line reason on failure.

    quantize: "int8" / "fp8" weight-only quantization of the block projections at load
    (nemojax.convert.quantize); a quantized checkpoint is served quantized without it."""
    from nemojax.checkpoint import CheckpointError, load_model
    from nemojax.config import ConfigError
    from nemojax.data.tokenizer import TokenizerError, load_tokenizer

    if not Path(checkpoint).exists():
        raise SetupError(f"checkpoint not found: {checkpoint} (give a nemojax checkpoint, a training run "
                         f"directory, a step directory or a Hugging Face Nemotron directory)")
    if quant_block_size and not quantize:
        raise SetupError("--quant-block-size applies to --quantize; give --quantize int8 or fp8 as well")
    spec = resolve_tokenizer_spec(tokenizer, checkpoint)
    try:
        tok = load_tokenizer(spec)
    except TokenizerError as e:
        raise SetupError(str(e)) from None
    kw = {} if dtype is None else {"param_dtype": dtype, "compute_dtype": dtype}
    try:
        model = load_model(checkpoint, progress=False, quantize=quantize, quant_block_size=quant_block_size, **kw)
    except (FileNotFoundError, CheckpointError, ConfigError) as e:
        raise SetupError(str(e).replace("\n", " ")) from None
    if not hasattr(model, "lm_head"):
        raise SetupError(f"{checkpoint} is not a language model checkpoint (a reward model?); serve it with "
                         f"`nemojax serve --reward-checkpoint`")
    return model, tok


def add_engine_arguments(p: argparse.ArgumentParser, *, slots: int, decode_steps: int,
                         max_len_help: str = "prompt + completion tokens per sample (default: the model's "
                                             "max_seq_len)") -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--batch-slots", type=int, default=slots, help="samples decoded together")
    g.add_argument("--max-len", type=int, default=None, help=max_len_help)
    g.add_argument("--decode-steps", type=int, default=decode_steps,
                   help="tokens per slot per host round-trip at most (a chunk ends early when a slot finishes)")
    g.add_argument("--max-prefill-batch", type=int, default=8, help="prompts prefilled together at most")
    g.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens per row of one prefill call (longer prompts are prefilled in chunks)")
    g.add_argument("--max-prefill-tokens", type=int, default=1024,
                   help="padded prompt tokens per prefill call: bounds how long a prefill delays running samples")
    g.add_argument("--prefix-cache-tokens", type=int, default=None,
                   help="tokens of prompt prefixes kept for reuse across requests (0 = off; default 2 x max-len)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute (and weight) dtype instead of the checkpoint's (default: the checkpoint's)")
    add_quantize_arguments(g)
    g.add_argument("--compile-cache", default=None,
                   help="directory for compiled programs (default: $JAX_COMPILATION_CACHE_DIR, else "
                        "$NEMOJAX_CACHE_DIR/jax_compile, else ~/.cache/nemojax/jax_compile)")


def add_quantize_arguments(g: Any) -> None:
    """--quantize / --quant-block-size: weight-only quantization at load (nemojax.model.quant)."""
    g.add_argument("--quantize", choices=["int8", "fp8"], default=None,
                   help="quantize the block projections at load: int8 or fp8 (e4m3) values with fp32 scales, "
                        "dequantized inside each matmul; embeddings, LM head, activations and the KV cache keep "
                        "--dtype (default: as stored; a checkpoint saved by `nemojax convert quantize` is "
                        "served quantized without this)")
    g.add_argument("--quant-block-size", type=int, default=0,
                   help="input elements per scale for --quantize (0 = one scale per output channel)")


def engine_from_args(model: Any, tokenizer: Any, args: argparse.Namespace, *, max_len: int | None = None,
                     seed: int = 0) -> Any:
    """The Engine the command-line flags describe; SetupError for impossible values."""
    from nemojax.inference import Engine

    cfg = model.cfg
    try:
        return Engine(model, max_slots=args.batch_slots, max_len=max_len or args.max_len,
                      decode_steps=args.decode_steps, max_prefill_batch=args.max_prefill_batch,
                      prefill_chunk=args.prefill_chunk, max_prefill_tokens=args.max_prefill_tokens,
                      prefix_cache_tokens=args.prefix_cache_tokens, tokenizer=tokenizer,
                      stop_token_ids=sorted({cfg.eos_id, tokenizer.eos_id}), seed=seed)
    except ValueError as e:
        raise SetupError(str(e)) from None
