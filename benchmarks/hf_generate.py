"""The Hugging Face side of the whole-process comparison: what `nemojax generate` does, with transformers.

Reads the same JSONL prompts ({"id", "prompt", optional "max_tokens"}), tokenizes them with the same SentencePiece model
(bos first), runs greedy `NemotronForCausalLM.generate` in left-padded batches (stopping at eos),
and writes {"id", "text", "output_ids"} lines. Timed from the outside, start-up included
(python, torch and transformers imports, weight loading).

    python benchmarks/hf_generate.py --model DIR --input prompts.jsonl --output out.jsonl \\
        --max-tokens 64 --batch-size 32 [--threads 1]
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="Hugging Face Nemotron directory")
    ap.add_argument("--tokenizer", required=True, help="SentencePiece .model")
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()

    import sentencepiece as spm
    import torch
    from transformers import NemotronForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    sp = spm.SentencePieceProcessor(model_file=args.tokenizer)
    model = NemotronForCausalLM.from_pretrained(args.model).eval()
    rows = [json.loads(line) for line in open(args.input, encoding="utf-8") if line.strip()]
    bos, eos = sp.bos_id(), sp.eos_id()
    ids = [[bos] + sp.encode(r["prompt"]) for r in rows]
    with open(args.output, "w", encoding="utf-8") as out:
        for start in range(0, len(ids), args.batch_size):
            chunk = ids[start:start + args.batch_size]
            width = max(map(len, chunk))
            batch = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros_like(batch)
            for r, p in enumerate(chunk):
                batch[r, width - len(p):] = torch.tensor(p)
                mask[r, width - len(p):] = 1
            want = [rows[start + r].get("max_tokens", args.max_tokens) for r in range(len(chunk))]
            with torch.no_grad():  # a static batch decodes until its longest request is done
                gen = model.generate(batch, attention_mask=mask, do_sample=False, max_new_tokens=max(want),
                                     pad_token_id=0, eos_token_id=eos)
            for r, row in enumerate(gen[:, width:].tolist()):
                row = row[:want[r]]
                toks = row[:row.index(eos)] if eos in row else row
                rec = rows[start + r]
                out.write(json.dumps({"id": rec["id"], "text": sp.decode(toks), "output_ids": toks}) + "\n")


if __name__ == "__main__":
    main()
