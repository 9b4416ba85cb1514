"""`nemojax convert from-hf HF_DIR OUT_DIR` / `to-hf CKPT HF_DIR` / `quantize CKPT OUT_DIR --mode fp8`.

from-hf turns a Hugging Face Nemotron directory (config.json + safetensors, single file or
sharded) into a nemojax model checkpoint (config.yaml + params/). to-hf writes any checkpoint
`nemojax.load` accepts (model checkpoint, training run or step directory) as a directory that
`transformers.NemotronForCausalLM.from_pretrained` loads. quantize writes a nemojax checkpoint whose
block projections are int8 or fp8 with fp32 scales, which `generate`, `serve` and `eval` load without
the original weights. All stream tensor by tensor.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nemojax.convert.hf import DEFAULT_MAX_SHARD_SIZE


def add_arguments(p: argparse.ArgumentParser) -> None:
    from nemojax.inference.setup import HelpFormatter

    p.description = __doc__
    p.formatter_class = HelpFormatter
    sub = p.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    a = sub.add_parser("from-hf", help="Hugging Face Nemotron directory -> nemojax model checkpoint",
                       formatter_class=HelpFormatter,
                       description="Convert a Hugging Face Nemotron directory (config.json + safetensors) into a "
                                   "nemojax model checkpoint; its tokenizer.model, if any, is copied along.")
    a.add_argument("hf_dir", help="directory with config.json and *.safetensors")
    a.add_argument("out_dir", help="where to write config.yaml and params/")
    a.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="parameter dtype to store (default: the checkpoint's; float16 becomes float32)")
    a.add_argument("--force", action="store_true", help="replace an existing OUT_DIR/params")
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    b = sub.add_parser("to-hf", help="nemojax checkpoint (model, run or step dir) -> Hugging Face directory",
                       formatter_class=HelpFormatter,
                       description="Write a nemojax checkpoint as a Hugging Face Nemotron directory that "
                                   "transformers (NemotronForCausalLM, AutoTokenizer with the chat template) and "
                                   "vLLM load: config.json, safetensors, tokenizer.model, tokenizer_config.json.")
    b.add_argument("ckpt", help="nemojax model checkpoint, training run directory or step directory")
    b.add_argument("hf_dir", help="output directory (config.json, model*.safetensors, tokenizer files); must be "
                                  "new or empty unless --force")
    b.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="tensor dtype to write (default: the model's param dtype)")
    b.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                   help="split into indexed shards above this size (e.g. 5GB, 500MB; default %(default)s)")
    b.add_argument("--tokenizer", default=None,
                   help="tokenizer to export: 'builtin', a SentencePiece .model, or a dir holding tokenizer.model "
                        "(default: the checkpoint's tokenizer.model if it has one, else builtin)")
    b.add_argument("--no-tokenizer", action="store_true", help="write the weights and config only")
    b.add_argument("--quantize", choices=["fp8"], default=None,
                   help="write the block projections as FP8 (e4m3, one scale per output channel) in the "
                        "compressed-tensors format vLLM loads (an fp8 checkpoint is written so without this)")
    b.add_argument("--force", action="store_true", help="write into a non-empty HF_DIR, replacing its files")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    q = sub.add_parser("quantize", help="any checkpoint -> nemojax checkpoint with int8 / fp8 block weights",
                       formatter_class=HelpFormatter,
                       description="Quantize the block projections (q, k, v, o, MLP up and down) of a checkpoint once "
                                   "and save the result: int8 or float8 e4m3 values with fp32 scales (weight-only; "
                                   "embeddings, LM head and norms keep their dtype). generate / serve / eval load it "
                                   "quantized, without the original weights.")
    q.add_argument("ckpt", help="nemojax model checkpoint, training run or step directory, or Hugging Face directory")
    q.add_argument("out_dir", help="where to write config.yaml and params/")
    q.add_argument("--mode", choices=["int8", "fp8"], required=True, help="value type of the quantized weights")
    q.add_argument("--block-size", type=int, default=0,
                   help="input elements per scale (0 = one scale per output channel)")
    q.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="dtype of the unquantized weights and of compute (default: the checkpoint's)")
    q.add_argument("--force", action="store_true", help="replace an existing OUT_DIR/params")
    q.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from nemojax.convert.hf import CheckpointError, convert_from_hf, convert_to_hf
    from nemojax.convert.quantize import convert_quantize
    from nemojax.data.tokenizer import TokenizerError

    source = args.hf_dir if args.direction == "from-hf" else args.ckpt
    if not Path(source).exists():  # a usage error like every command's missing path: exit 2
        print(f"nemojax convert {args.direction}: error: {source} does not exist", file=sys.stderr)
        return 2
    try:
        if args.direction == "from-hf":
            out = convert_from_hf(args.hf_dir, args.out_dir, param_dtype=args.dtype,
                                  overwrite=args.force, progress=not args.quiet)
        elif args.direction == "quantize":
            out = convert_quantize(args.ckpt, args.out_dir, mode=args.mode, block_size=args.block_size,
                                   param_dtype=args.dtype, overwrite=args.force, progress=not args.quiet)
        else:
            tokenizer = None if args.no_tokenizer else (args.tokenizer or "auto")
            out = convert_to_hf(args.ckpt, args.hf_dir, dtype=args.dtype, max_shard_size=args.max_shard_size,
                                progress=not args.quiet, overwrite=args.force, tokenizer=tokenizer,
                                quantize=args.quantize)
    except FileExistsError as e:
        print(f"nemojax convert {args.direction}: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, CheckpointError, TokenizerError) as e:  # a broken input: a missing shard, a bad file
        print(f"nemojax convert {args.direction}: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
