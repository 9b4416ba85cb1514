"""Chat data -> token ids: the one tokenization convention for training, generation and serving.

The convention (documented with examples in docs/DATA.md):

* Every sequence starts with bos (`tokenizer.bos_id`), then the Nemotron-4 template
  (`nemojax.data.chat_template`), tokenized segment by segment.
* Template text is encoded as is, so `<extra_id_0>`, `<extra_id_1>`, `<extra_id_2>` become the
  control tokens. Message *content* is encoded with those strings (and `<s>`, `</s>`) escaped:
  the text is cut right after the `<` of each occurrence before encoding, so a SentencePiece
  user-defined symbol can never match inside content and the string becomes ordinary pieces
  (`<` + `extra_id_1>` ...). Decoding gives the original text back. A user cannot inject a turn
  boundary through a message.
* The training loss mask (`ChatTokens.loss_mask[i]` True = token i is predicted by the loss)
  covers each assistant message's tokens, the "\\n" that ends it and the `<extra_id_1>` that
  follows it. A conversation that ends with an assistant message gets that closing
  `<extra_id_1>` appended for training, so the model learns to stop where generation stops.
  Nothing else (system, user, template headers) is trained on.
* A prompt for generation (`prompt_ids`) is the same token sequence up to and including
  `<extra_id_1>Assistant\\n`: for any conversation, `prompt_ids(tok, msgs)` followed by the tokens
  of the answer is exactly `encode_chat(tok, msgs + [answer]).ids`. Training, `nemojax
  generate`, `nemojax serve` and the reward scorer all build sequences with these functions.

Segment-wise encoding equals encoding the rendered string in one call whenever the content has
no control strings, because every segment boundary of the template falls on "\\n" or a
`<extra_id_*>` piece, which the project's tokenizers (`nemojax tokenizer train`, the shipped
model) hold as user-defined symbols, i.e. hard piece boundaries.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from nemojax.data.chat_template import (CONTROL_STRINGS, REWARD_TOKEN, TURN_TOKEN, ChatFormatError,
                                        check_ends_with_assistant, chat_segments)

Message = Mapping[str, str]
_CONTROL_START = re.compile("|".join(re.escape(s) for s in CONTROL_STRINGS))
_CHAT_PIECES = ("<extra_id_0>", "<extra_id_1>", "<extra_id_2>")
_CONTROL_IDS: "weakref.WeakKeyDictionary[Any, frozenset[int]]" = weakref.WeakKeyDictionary()


class ChatTokens(NamedTuple):
    """Token ids of one conversation and, per token, whether the SFT loss predicts it."""

    ids: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # bool [n]


def _control_ids(tokenizer: Any) -> frozenset[int]:
    """Ids content must never produce: bos/eos/pad and the chat control pieces."""
    cached = _CONTROL_IDS.get(tokenizer)
    if cached is None:
        ids = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
        ids |= {tokenizer.special_id(p) for p in _CHAT_PIECES}
        cached = _CONTROL_IDS[tokenizer] = frozenset(i for i in ids if i >= 0)
    return cached


def encode_content(tokenizer: Any, text: str) -> list[int]:
    """Token ids of message content, with control strings escaped (see the module docstring)."""
    cuts = [m.start() + 1 for m in _CONTROL_START.finditer(text)]
    if not cuts:
        return tokenizer.encode(text)
    ids: list[int] = []
    start = 0
    for cut in cuts + [len(text)]:
        if cut > start:
            ids += tokenizer.encode(text[start:cut])
        start = cut
    leaked = _control_ids(tokenizer).intersection(ids)
    if leaked:  # only a tokenizer with unusual control pieces gets here
        raise ChatFormatError(f"the tokenizer turns message text {text[:60]!r} into control token(s) "
                              f"{sorted(leaked)} even when escaped; use a tokenizer whose control pieces all "
                              f"start with '<' (as `nemojax tokenizer train` makes them)")
    return ids


def _encode_segments(tokenizer: Any, segments: Sequence[Any], bos: bool) -> ChatTokens:
    ids: list[int] = [tokenizer.bos_id] if bos else []
    mask: list[bool] = [False] * len(ids)
    for seg in segments:
        if not seg.text:
            continue
        part = encode_content(tokenizer, seg.text) if seg.content else tokenizer.encode(seg.text)
        ids += part
        mask += [seg.trains] * len(part)
    return ChatTokens(np.asarray(ids, np.int32), np.asarray(mask, bool))


def encode_chat(tokenizer: Any, messages: Sequence[Message], *, add_generation_prompt: bool = False,
                bos: bool = True) -> ChatTokens:
    """bos + the templated conversation as ids, with the SFT loss mask.

    add_generation_prompt=False (training): a conversation ending with an assistant message is
    closed with `<extra_id_1>` (trained on). add_generation_prompt=True: the conversation is
    followed by `<extra_id_1>Assistant\\n` unless it already ends with an assistant message.
    Raises ChatFormatError for a malformed conversation, TokenizerError for a tokenizer without
    the chat control pieces.
    """
    _control_ids(tokenizer)  # a tokenizer without <extra_id_*> fails here, with a clear message
    ends_assistant = bool(messages) and isinstance(messages[-1], Mapping) and \
        messages[-1].get("role") == "assistant"
    end = TURN_TOKEN if ends_assistant and not add_generation_prompt else ""
    segs = chat_segments(messages, add_generation_prompt=add_generation_prompt, end=end)
    return _encode_segments(tokenizer, segs, bos)


def prompt_ids(tokenizer: Any, prompt: str | Sequence[Message], *, bos: bool = True) -> list[int]:
    """The ids a model is given to continue: what `generate` / `serve` feed the engine.

    A list of messages is templated and followed by `<extra_id_1>Assistant\\n` (content escaped).
    A string is a raw completion prompt, encoded literally (control strings in it DO become
    control tokens, so a hand-templated prompt works). bos first unless bos=False.
    """
    if isinstance(prompt, str):
        return ([tokenizer.bos_id] if bos else []) + list(tokenizer.encode(prompt))
    return encode_chat(tokenizer, prompt, add_generation_prompt=True, bos=bos).ids.tolist()


def encode_reward_input(tokenizer: Any, messages: Sequence[Message], *, bos: bool = True) -> list[int]:
    """bos + the conversation + `<extra_id_2>`: what the reward model reads (its last token).

    The conversation must end with the assistant response being scored.
    """
    check_ends_with_assistant(messages, "a reward-model input")
    _control_ids(tokenizer)
    segs = chat_segments(messages, add_generation_prompt=False, end=REWARD_TOKEN)
    return _encode_segments(tokenizer, segs, bos).ids.tolist()
