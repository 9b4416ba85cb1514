"""`nemojax convert from-hf HF_DIR OUT_DIR` / `nemojax convert to-hf CKPT HF_DIR`.

from-hf turns a Hugging Face Nemotron directory (config.json + safetensors, single file or
sharded) into a nemojax model checkpoint (config.yaml + params/). to-hf writes any checkpoint
`nemojax.load` accepts (model checkpoint, training run or step directory) as a directory that
`transformers.NemotronForCausalLM.from_pretrained` loads. Both stream tensor by tensor.
"""

from __future__ import annotations

import argparse
import sys

from nemojax.convert.hf import DEFAULT_MAX_SHARD_SIZE


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    a = sub.add_parser("from-hf", help="Hugging Face Nemotron directory -> nemojax model checkpoint")
    a.add_argument("hf_dir", help="directory with config.json and *.safetensors")
    a.add_argument("out_dir", help="where to write config.yaml and params/")
    a.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="parameter dtype to store (default: the checkpoint's; float16 becomes float32)")
    a.add_argument("--force", action="store_true", help="replace an existing OUT_DIR/params")
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    b = sub.add_parser("to-hf", help="nemojax checkpoint (model, run or step dir) -> Hugging Face directory")
    b.add_argument("ckpt", help="nemojax model checkpoint, training run directory or step directory")
    b.add_argument("hf_dir", help="output directory (config.json + model*.safetensors)")
    b.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="tensor dtype to write (default: the model's param dtype)")
    b.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                   help="split into indexed shards above this size (e.g. 5GB, 500MB; default %(default)s)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from nemojax.convert.hf import CheckpointError, convert_from_hf, convert_to_hf

    try:
        if args.direction == "from-hf":
            out = convert_from_hf(args.hf_dir, args.out_dir, param_dtype=args.dtype,
                                  overwrite=args.force, progress=not args.quiet)
        else:
            out = convert_to_hf(args.ckpt, args.hf_dir, dtype=args.dtype,
                                max_shard_size=args.max_shard_size, progress=not args.quiet)
    except (CheckpointError, FileNotFoundError, FileExistsError) as e:
        print(f"nemojax convert {args.direction}: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
