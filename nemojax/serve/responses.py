"""OpenAI response bodies from engine events: whole responses and server-sent event streams.

A stream sends one chunk per generated token (the engine's `TokenDelta`s), each with that
token's log-prob (and alternatives) when asked; text the engine holds back (a possible stop
string, an incomplete character) arrives with the token that makes it certain. For chat, a
trailing newline is held back one token: the template puts one before `<extra_id_1>`, and it is
not part of the reply.
"""

from __future__ import annotations

import json
from typing import Any

from nemojax.inference.requests import Completion, TokenDelta
from nemojax.serve.protocol import Job

TOKEN_CONTEXT = 8  # preceding tokens decoded with a token to get its own text


class TokenTexts:
    """Each token's own share of the decoded text, and the display text of any token id."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._pieces: dict[int, str] = {}

    def of_sequence(self, ids: list[int]) -> list[str]:
        """SentencePiece drops a piece's leading space at the start of a decode and joins byte
        pieces into characters, so a token's text is decode(window + token) minus
        decode(window), over a few preceding tokens (linear time, unlike whole prefixes)."""
        out = []
        for i in range(len(ids)):
            out.append(self.one(ids[max(0, i - TOKEN_CONTEXT):i], ids[i]))
        return out

    def one(self, context: list[int], token: int) -> str:
        prev = self.tokenizer.decode(context) if context else ""
        cur = self.tokenizer.decode(context + [token])
        return cur[len(prev):] if cur.startswith(prev) else cur

    def piece(self, token: int) -> str:
        """An alternative token's text on its own (its leading space kept)."""
        text = self._pieces.get(token)
        if text is None:
            text = self.one([], token)
            try:
                raw = self.tokenizer.id_to_piece(token)
                if raw.startswith("\u2581"):
                    text = " " + text.lstrip(" ")
            except Exception:
                pass
            self._pieces[token] = text
        return text


def usage(job: Job, completion_tokens: int, cached: int = 0) -> dict[str, Any]:
    prompt_tokens = sum(len(r.prompt_ids) for r in job.requests)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}


def choice_index(job: Job, request_id: Any, sample_index: int) -> int:
    prompt_index = next(i for i, r in enumerate(job.requests) if r.id == request_id)
    return prompt_index * job.params.n + sample_index


def final_text(job: Job, c: Completion) -> str:
    text = c.text or ""
    if job.kind == "chat" and c.finish_reason == "stop":
        text = text.removesuffix("\n")  # the template's newline before <extra_id_1>
    return text


def _chat_entry(texts: TokenTexts, token_text: str, lp: float, top: list[tuple[int, float]] | None) -> dict:
    alts = [{"token": texts.piece(t), "logprob": v, "bytes": list(texts.piece(t).encode("utf-8"))}
            for t, v in (top or [])]
    return {"token": token_text, "logprob": lp, "bytes": list(token_text.encode("utf-8")), "top_logprobs": alts}


def _top_dict(texts: TokenTexts, top: list[tuple[int, float]] | None) -> dict[str, float] | None:
    return None if top is None else {texts.piece(t): v for t, v in top}


def logprobs_body(job: Job, c: Completion, texts: TokenTexts, prompt_text: str = "") -> Any:
    """OpenAI's logprobs object for one whole choice (None unless the request asked for it)."""
    if not job.logprobs:
        return None
    lps = c.logprobs or []
    tokens = texts.of_sequence(c.output_ids)
    tops = c.top_logprobs if job.top_logprobs else [None] * len(tokens)
    if job.kind == "chat":
        return {"content": [_chat_entry(texts, t, lp, top) for t, lp, top in zip(tokens, lps, tops)]}
    all_tokens, all_lps, all_tops = [], [], []
    if job.echo:
        prompt_ids = next(r.prompt_ids for r in job.requests if r.id == c.request_id)
        all_tokens = texts.of_sequence(prompt_ids)
        all_lps = list(c.prompt_logprobs or [None] * len(prompt_ids))
        ptops = c.prompt_top_logprobs or [None] * len(prompt_ids)
        all_tops = [_top_dict(texts, t) if job.top_logprobs and t is not None else None for t in ptops]
    all_tokens += tokens
    all_lps += list(lps)
    all_tops += [_top_dict(texts, t) if job.top_logprobs else None for t in tops]
    offsets, pos = [], 0
    for t in all_tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": all_tokens, "token_logprobs": all_lps,
            "top_logprobs": all_tops if job.top_logprobs else None, "text_offset": offsets}


def whole_response(job: Job, completions: list[Completion], texts: TokenTexts, model_name: str) -> dict[str, Any]:
    completions = sorted(completions, key=lambda c: choice_index(job, c.request_id, c.sample_index))
    choices = []
    for c in completions:
        text = final_text(job, c)
        choice: dict[str, Any] = {"index": choice_index(job, c.request_id, c.sample_index)}
        if job.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            prompt_text = job.prompt_texts[[r.id for r in job.requests].index(c.request_id)] if job.echo else ""
            choice["text"] = prompt_text + text
        choice["logprobs"] = logprobs_body(job, c, texts)
        choice["finish_reason"] = c.finish_reason
        choices.append(choice)
    cached = sum(c.cached_tokens for c in completions if c.sample_index == 0)
    return {"id": job.id, "object": "chat.completion" if job.kind == "chat" else "text_completion",
            "created": job.created, "model": model_name, "choices": choices,
            "usage": usage(job, sum(c.completion_tokens for c in completions), cached)}


def sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode("utf-8")


class StreamState:
    """Per-choice bookkeeping of one streamed response; turns events into SSE chunks."""

    def __init__(self, job: Job, texts: TokenTexts, model_name: str) -> None:
        self.job, self.texts, self.model_name = job, texts, model_name
        self.chat = job.kind == "chat"
        self.sent: dict[int, str] = {}  # choice -> text sent
        self.held: dict[int, str] = {}  # chat: a trailing "\n" not sent yet
        self.ids: dict[int, list[int]] = {}  # choice -> tokens seen (for token texts)
        self.offsets: dict[int, int] = {}
        self.completion_tokens = 0
        self.cached = 0

    def _chunk(self, index: int, text: str, finish: str | None, logprobs: Any) -> bytes:
        job = self.job
        if self.chat:
            delta = {"content": text} if text or finish is None else {}
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        body: dict[str, Any] = {"id": job.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                                "created": job.created, "model": self.model_name, "choices": [choice]}
        if job.include_usage:
            body["usage"] = None
        return sse(body)

    def opening(self) -> list[bytes]:
        """Chat: a role delta per choice. Completions with echo: the prompt text per choice."""
        job, out = self.job, []
        for i in range(job.samples):
            if self.chat:
                body = {"id": job.id, "object": "chat.completion.chunk", "created": job.created,
                        "model": self.model_name, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                                "logprobs": None, "finish_reason": None}]}
                if job.include_usage:
                    body["usage"] = None
                out.append(sse(body))
            elif job.echo:
                text = job.prompt_texts[i // job.params.n]
                self.offsets[i] = len(text)
                out.append(self._chunk(i, text, None, None))
        return out

    def _text(self, index: int, text: str) -> str:
        """Chat: keep a trailing newline back until more text follows."""
        if not self.chat:
            return text
        text = self.held.pop(index, "") + text
        if text.endswith("\n"):
            self.held[index] = "\n"
            text = text[:-1]
        return text

    def token(self, d: TokenDelta) -> bytes:
        index = choice_index(self.job, d.request_id, d.sample_index)
        ids = self.ids.setdefault(index, [])
        token_text = self.texts.one(ids[-TOKEN_CONTEXT:], d.token_id)
        ids.append(d.token_id)
        text = self._text(index, d.text)
        self.sent[index] = self.sent.get(index, "") + text
        logprobs = None
        if self.job.logprobs:
            if self.chat:
                logprobs = {"content": [_chat_entry(self.texts, token_text, d.logprob, d.top_logprobs)]}
            else:
                offset = self.offsets.get(index, 0)
                self.offsets[index] = offset + len(token_text)
                logprobs = {"tokens": [token_text], "token_logprobs": [d.logprob],
                            "top_logprobs": [_top_dict(self.texts, d.top_logprobs)] if self.job.top_logprobs else None,
                            "text_offset": [offset]}
        return self._chunk(index, text, None, logprobs)

    def finish(self, c: Completion) -> bytes:
        """The choice's last chunk: any text not sent yet and the finish reason."""
        index = choice_index(self.job, c.request_id, c.sample_index)
        self.completion_tokens += c.completion_tokens
        if c.sample_index == 0:
            self.cached += c.cached_tokens
        final = final_text(self.job, c)
        sent = self.sent.get(index, "")
        rest = final[len(sent):] if final.startswith(sent) else ""
        return self._chunk(index, rest, c.finish_reason, None)

    def closing(self) -> list[bytes]:
        out = []
        if self.job.include_usage:
            job = self.job
            out.append(sse({"id": job.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                            "created": job.created, "model": self.model_name, "choices": [],
                            "usage": usage(job, self.completion_tokens, self.cached)}))
        out.append(b"data: [DONE]\n\n")
        return out
