"""Host-local pretraining data: documents tokenized per step by one process' share of a global
batch, for P = 1, 2, 4, 8 data-parallel processes, and the one-time cost of a length index.
Prints one JSON object.

The corpus is the built-in one (prose + code) written as a JSONL file, so every document must
be tokenized to be read. Process 0 of P holds the first batch/P rows (data parallelism across
hosts), which is what it asks the pipeline for. Documents tokenized are counted by wrapping the
tokenizer, so the script measures any nemojax version that has `make_batch_iterator`:

    python benchmarks/host_local_data.py --workdir /tmp/hld              # this checkout
    PYTHONPATH=/path/to/older/nemojax python benchmarks/host_local_data.py --workdir /tmp/hld-old

first_open_s is the first `make_batch_iterator` on the file (it builds and caches the length
index: one full tokenization); second_open_s the next one (cached). Set NEMOJAX_CACHE_DIR to an
empty directory to measure a first open.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True, help="where the JSONL corpus is written")
    ap.add_argument("--batch", type=int, default=64, help="global batch (rows)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from nemojax.config import DataConfig, DataSourceConfig
    from nemojax.data.corpus import builtin_documents
    from nemojax.data.pretrain import make_batch_iterator
    from nemojax.data.tokenizer import load_tokenizer

    d = Path(args.workdir)
    d.mkdir(parents=True, exist_ok=True)
    src = d / "prose_code.jsonl"
    if not src.exists():
        with src.open("w") as f:
            for name in ("prose", "code"):
                for text in builtin_documents(name):
                    f.write(json.dumps({"text": text}) + "\n")
    os.chdir(d)  # a relative source path: the document order does not depend on --workdir
    tok = load_tokenizer("builtin")
    tokenized = {"n": 0}
    encode = tok.encode_batch

    def counted(texts, *a, **k):
        tokenized["n"] += len(texts)
        return encode(texts, *a, **k)

    tok.encode_batch = counted
    cfg = DataConfig(sources=[DataSourceConfig(path=src.name)], validation_fraction=0.0)
    out: dict = {"corpus_bytes": src.stat().st_size, "batch": args.batch, "seq_len": args.seq_len,
                 "steps": args.steps, "seed": args.seed}
    for key in ("first_open_s", "second_open_s"):
        t0 = time.perf_counter()
        make_batch_iterator(cfg, batch_size=args.batch, seq_len=args.seq_len, seed=args.seed)
        out[key] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    hashlib.sha256(src.read_bytes())
    out["sha256_s"] = round(time.perf_counter() - t0, 3)
    for p in (1, 2, 4, 8):
        it = make_batch_iterator(cfg, batch_size=args.batch, seq_len=args.seq_len, seed=args.seed,
                                 rows=list(range(args.batch // p)))
        tokenized["n"] = 0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            next(it)
        out[f"processes_{p}"] = {"documents_tokenized_per_step": tokenized["n"] / args.steps,
                                 "seconds_per_step": round((time.perf_counter() - t0) / args.steps, 3)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
