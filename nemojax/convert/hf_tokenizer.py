"""A Hugging Face tokenizer directory for a nemojax SentencePiece tokenizer.

`save_hf_tokenizer` writes what `transformers.AutoTokenizer.from_pretrained(dir)` (and so
vLLM, TGI, lm-eval ...) needs to tokenize exactly as nemojax does, offline:

- `tokenizer.model`: the SentencePiece model itself (transformers builds its fast tokenizer
  from it, byte fallback included);
- `tokenizer_config.json`: LlamaTokenizer (a plain SentencePiece BPE wrapper), bos prepended and
  eos not, the model's own whitespace handling (`add_prefix_space` follows the model's
  `add_dummy_prefix`), the chat control pieces as special tokens, and the Nemotron-4 chat
  template in Jinja, which renders exactly `nemojax.data.chat_template.format_chat` (with bos
  in front, as `nemojax.data.chat.prompt_ids` puts it);
- `special_tokens_map.json`, and `generation_config.json` whose eos ids include `<extra_id_1>`
  so a chat reply stops where nemojax's does.

What the template cannot reproduce: nemojax escapes control-token text inside message content
(`data.chat.encode_content`); a Jinja template renders text, so such content would tokenize
into control tokens there.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

CHAT_PIECES = ("<extra_id_0>", "<extra_id_1>", "<extra_id_2>")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")

# The Nemotron-4 template. No `-` trimming and no newline right after a block tag: transformers
# renders with trim_blocks, which would eat it.
CHAT_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set body = messages[1:] %}{% else %}{% set system = '' %}{% set body = messages %}{% endif %}"
    "{{ bos_token }}<extra_id_0>System\n{{ system }}\n"
    "{% for m in body %}"
    "{% if m['role'] not in ['user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role'] + ': after an optional first system message, use user or assistant') }}"
    "{% endif %}"
    "<extra_id_1>{{ 'User' if m['role'] == 'user' else 'Assistant' }}\n{{ m['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt and (not body or body[-1]['role'] != 'assistant') %}<extra_id_1>Assistant\n"
    "{% endif %}"
)


def _adds_dummy_prefix(model_path: Path) -> bool:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    return bool(proto.normalizer_spec.add_dummy_prefix)


def save_hf_tokenizer(tokenizer: Any, out_dir: str | Path, *, max_len: int) -> list[Path]:
    """Write the files above for `tokenizer` (a `nemojax.data.tokenizer.Tokenizer`); returns them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_file = out / "tokenizer.model"
    shutil.copyfile(tokenizer.path, model_file)
    piece = tokenizer.id_to_piece
    specials = {"bos_token": piece(tokenizer.bos_id), "eos_token": piece(tokenizer.eos_id),
                "unk_token": piece(tokenizer.unk_id), "pad_token": piece(tokenizer.pad_id)}
    chat = [p for p in CHAT_PIECES if _has_piece(tokenizer, p)]
    config = {"tokenizer_class": "LlamaTokenizer", **specials, "additional_special_tokens": chat,
              "add_bos_token": True, "add_eos_token": False, "add_prefix_space": _adds_dummy_prefix(model_file),
              "legacy": False, "clean_up_tokenization_spaces": False, "model_max_length": int(max_len),
              "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({**specials, "additional_special_tokens": chat}, indent=2, ensure_ascii=False) + "\n")
    eos = [tokenizer.eos_id] + ([tokenizer.special_id("<extra_id_1>")] if "<extra_id_1>" in chat else [])
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tokenizer.bos_id, "eos_token_id": eos, "pad_token_id": tokenizer.pad_id}, indent=2) + "\n")
    return [out / name for name in TOKENIZER_FILES]


def _has_piece(tokenizer: Any, text: str) -> bool:
    try:
        tokenizer.special_id(text)
        return True
    except Exception:
        return False
