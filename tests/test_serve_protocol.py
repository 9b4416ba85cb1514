"""OpenAI request parsing (nemojax/serve/protocol.py) as pure functions: no server, no model.

The HTTP tests (test_serve.py, test_serve_hardening.py, test_serve_limits.py) check that bad
requests become 4xx errors naming the field; they start a server, so under mutation testing
(`scripts/mutation.py serve`) each protocol mutant costs seconds. These tests reach the same
code in microseconds and pin it down tighter, so the cheap mutants die here first:

* every refusal is checked for its status, `param`, `code` and its FULL message (equality), so
  a changed message string, a changed status or a param naming the wrong field fails;
* every bound is checked on both sides (the limit accepted, one past it refused), so `<` / `<=`
  swaps, off-by-one constants and `and` / `or` swaps fail;
* every accepted request is checked for what it parses to (each SamplingParams field, the
  defaults, the stream flags, the prompt ids), and chat prompts against an encoding of the
  rendered template built here without `nemojax.data.chat.prompt_ids`, so a dropped argument
  (bos, the field name) or a changed default fails.

A Parser is built directly on the builtin tokenizer with a 48-token context.
"""

from __future__ import annotations

import re
import time

import pytest

from nemojax.data.chat_template import format_chat
from nemojax.data.tokenizer import TokenizerError, load_tokenizer
from nemojax.inference.requests import Request
from nemojax.inference.sampling import SamplingParams
from nemojax.serve import protocol
from nemojax.serve.protocol import (APIError, Job, Parser, _check_tree, bad, check_fields, longest_piece,
                                    normalize_messages, parse_json_body, sampling_params, stream_flags)

MAX_LEN = 48
VOCAB = 4096
TOK = load_tokenizer("builtin")
BOS = TOK.bos_id
TURN = TOK.special_id("<extra_id_1>")
LONGEST = 16  # characters of the builtin tokenizer's longest piece (checked below)
MAX_CHARS = 2 * MAX_LEN * LONGEST
SHAPE = ("prompt: must be a string, a non-empty list of strings, a non-empty list of token ids, "
         "or a list of such lists")
USER = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def parser() -> Parser:
    return Parser(TOK, "tiny", MAX_LEN, VOCAB, bos=True)


def refusal(call, *args, status: int = 400, param: str | None, message: str, code: str | None = None,
            **kwargs) -> APIError:
    """Run `call`, which must raise exactly this APIError (OpenAI's invalid_request_error)."""
    with pytest.raises(APIError) as info:
        call(*args, **kwargs)
    err = info.value
    assert (err.status, err.param, err.message, err.code, err.type) == \
        (status, param, message, code, "invalid_request_error"), err.body()
    assert str(err) == message
    return err


def too_long(n: int, param: str = "prompt", max_len: int = MAX_LEN) -> str:
    return (f"{param}: the prompt has {n} tokens but this server's context is {max_len} tokens "
            f"(prompt + completion), so at most {max_len - 1} prompt tokens fit")


# --------------------------------------------------------------------------- errors and JSON


def test_api_error_body_is_openais_shape():
    """Kills: a changed default type / code / status, `headers or {}` mutated, `bad` dropping
    the param from the message or changing its status."""
    e = APIError(429, "full", headers={"Retry-After": "3"}, code="queue_full", type="server_error")
    assert e.body() == {"error": {"message": "full", "type": "server_error", "param": None, "code": "queue_full"}}
    assert (e.status, e.headers) == (429, {"Retry-After": "3"})
    plain = APIError(404, "gone")
    assert plain.body() == {"error": {"message": "gone", "type": "invalid_request_error", "param": None,
                                      "code": None}}
    assert plain.headers == {} and str(plain) == "gone"
    b = bad("n", "too big")
    assert (b.status, b.param, b.message, b.code, b.type) == (400, "n", "n: too big", None, "invalid_request_error")


@pytest.mark.parametrize("raw,message", [
    (b"{not json", "the request body is not valid JSON (Expecting property name enclosed in double quotes: "
                   "line 1 column 2 (char 1))"),
    (b'{"prompt": "x"} trailing', "the request body is not valid JSON (Extra data: line 1 column 17 (char 16))"),
    (b"", "the request body is not valid JSON (Expecting value: line 1 column 1 (char 0))"),
    (b"\xff", "the request body is not valid JSON ('utf-8' codec can't decode byte 0xff in position 0: "
              "invalid start byte)"),
    (b'{"a": NaN}', "the request body is not valid JSON (NaN is not a valid JSON number)"),
    (b'{"a": [-Infinity]}', "the request body is not valid JSON (-Infinity is not a valid JSON number)"),
    (b'{"a": Infinity}', "the request body is not valid JSON (Infinity is not a valid JSON number)"),
    (b"[1, 2]", "the request body must be a JSON object"),
    (b'"x"', "the request body must be a JSON object"),
    (b"null", "the request body must be a JSON object"),
    (b'{"a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "the request body nests deeper than 32 levels"),
])
def test_bodies_that_are_not_json_objects_are_refused(raw, message):
    """Kills: the NaN / Infinity hook dropped (`parse_constant` removed: json accepts them),
    changed messages, the RecursionError branch removed (a 500) or the object check inverted."""
    refusal(parse_json_body, raw, param=None, message=message)


def test_containers_are_counted_before_parsing_arrays_and_objects_alike():
    """Kills: `>` -> `>=` on MAX_JSON_CONTAINERS, `+` -> `-` between the two counts (a body of
    objects, or one of arrays, would slip through), the constant or its message changed."""
    limit = protocol.MAX_JSON_CONTAINERS
    assert limit == 2**16
    arrays = b'{"a": [' + b",".join([b"[]"] * (limit - 2)) + b"]}"  # exactly `limit` containers
    assert parse_json_body(arrays)["a"][0] == []
    message = "the request body has more than 65536 JSON arrays and objects"
    refusal(parse_json_body, b'{"a": [' + b",".join([b"[]"] * (limit - 1)) + b"]}", param=None, message=message)
    refusal(parse_json_body, b'{"a": [' + b",".join([b"{}"] * (limit - 1)) + b"]}", param=None, message=message)


def test_nesting_depth_bound_is_exact():
    """Kills: `depth > MAX` -> `>=`, the depth not incremented per level, the constant changed.
    The body is depth 1, so {"a": [[...]]} with k lists is depth k + 1."""
    assert protocol.MAX_JSON_DEPTH == 32
    deepest = parse_json_body(b'{"a": ' + b"[" * 31 + b"]" * 31 + b"}")["a"]  # depth 32: accepted
    for _ in range(30):
        [deepest] = deepest
    assert deepest == []
    refusal(parse_json_body, b'{"a": ' + b"[" * 32 + b"]" * 32 + b"}", param=None,
            message="the request body nests deeper than 32 levels")
    mixed = b'{"a": ' + b'{"b": [' * 15 + b"]}" * 15 + b"}"  # 1 + 30 levels, objects and lists
    assert parse_json_body(mixed)
    refusal(parse_json_body, b'{"a": ' + b'{"b": [' * 16 + b"]}" * 16 + b"}", param=None,
            message="the request body nests deeper than 32 levels")


@pytest.mark.parametrize("raw,param,message", [
    (b'{"temperature": 1e999}', "temperature", "temperature: numbers must be finite"),
    (b'{"stop": ["a", -1e999]}', "stop", "stop[1]: numbers must be finite"),
    (b'{"messages": [{"role": "user", "content": 1e400}]}', "messages", "messages[0].content: numbers must be finite"),
    (b'{"prompt": [[1, 2], [3, [4, 1E999]]]}', "prompt", "prompt[1][1][1]: numbers must be finite"),
])
def test_overflowing_numbers_are_refused_naming_their_path(raw, param, message):
    """1e999 parses to inf. Kills: the finiteness test inverted or dropped, `type(item) is
    float` mutated, the path built wrongly (dict vs list steps, the top-level key without a
    dot), the param not cut at the first "." / "[", nested containers not walked."""
    refusal(parse_json_body, raw, param=param, message=message)


def test_check_tree_walks_values_not_keys_and_accepts_finite_numbers():
    """Kills: ints, bools, strings or finite floats refused; a NaN met in a nested dict missed."""
    body = {"a": 1.5, "b": [0.0, -2.25, 10**400, True, None, "inf", {"c": [1e308]}], "inf": 3}
    _check_tree(body)
    assert parse_json_body(b'{"a": 1.5, "b": [1e308, -0.0, 12345678901234567890]}')["b"][2] == 12345678901234567890
    refusal(_check_tree, {"x": {"y": {"z": float("nan")}}}, param="x", message="x.y.z: numbers must be finite")


# --------------------------------------------------------------------------- fields


COMPLETION_ONLY = ["prompt", "echo", "suffix", "best_of"]
CHAT_ONLY = ["messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice",
             "functions", "function_call"]
COMMON = ["model", "temperature", "top_p", "top_k", "min_p", "n", "stop", "seed", "stream", "stream_options",
          "max_tokens", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
          "user", "metadata", "store", "service_tier", "parallel_tool_calls"]


def test_each_endpoint_accepts_exactly_its_fields():
    """Kills: a field name string mutated in COMMON / COMPLETION / CHAT / IGNORED_FIELDS (the
    field would be refused, or an unknown one let through), the unknown-field message changed."""
    for name in COMMON + COMPLETION_ONLY:
        check_fields({name: None}, protocol.COMPLETION_FIELDS)
    for name in COMMON + CHAT_ONLY:
        check_fields({name: None}, protocol.CHAT_FIELDS)
    for name in CHAT_ONLY + ["max_tokenz", "best_of_n"]:
        refusal(check_fields, {"prompt": "x", name: 1}, protocol.COMPLETION_FIELDS, param=name,
                message=f"{name}: unrecognized request argument (not supported by this server)")
    for name in COMPLETION_ONLY:
        refusal(check_fields, {name: 1}, protocol.CHAT_FIELDS, param=name,
                message=f"{name}: unrecognized request argument (not supported by this server)")


@pytest.mark.parametrize("name", ["presence_penalty", "frequency_penalty"])
def test_penalties_only_zero(name):
    """Kills: the default 0 changed (an absent penalty refused), `or` -> `and` (a bool or a
    string that equals 0 accepted, or 0.5 accepted), the loop's names mutated."""
    for ok in (0, 0.0, None, -0.0):
        check_fields({name: ok}, protocol.COMPLETION_FIELDS)
    for no in (0.5, -1, "0", True, False, [0]):
        refusal(check_fields, {name: no}, protocol.COMPLETION_FIELDS, param=name,
                message=f"{name}: only 0 is supported")


def test_logit_bias_only_empty():
    """Kills: the logit_bias check dropped or inverted (an empty map refused)."""
    for ok in (None, {}):
        check_fields({"logit_bias": ok}, protocol.CHAT_FIELDS)
    refusal(check_fields, {"logit_bias": {"5": 10}}, protocol.CHAT_FIELDS, param="logit_bias",
            message="logit_bias: not supported")


def test_sampling_defaults():
    """Kills: any default changed (temperature 1, top_p 1, min_p 0, top_k 0, n 1, no stop, no
    seed), max_tokens_default ignored, the chat placeholder (None -> 1) changed, JSON null not
    meaning the default, prompt_logprobs left on."""
    p = sampling_params({}, 16)
    assert p == SamplingParams(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, max_tokens=16, stop=[],
                               stop_token_ids=[], seed=None, n=1, logprobs=False, top_logprobs=0,
                               prompt_logprobs=False)
    nulls = {k: None for k in ("temperature", "top_p", "min_p", "top_k", "max_tokens", "n", "stop", "seed")}
    assert sampling_params(nulls, 7) == SamplingParams(max_tokens=7)
    assert sampling_params({}, None).max_tokens == 1
    assert sampling_params({}, 0, allow_zero_tokens=True).max_tokens == 0


def test_sampling_values_pass_through():
    """Kills: a field read from the wrong key or not stored, `max(top_k, 0)` mutated, the
    max_tokens field name ignored (chat's max_completion_tokens)."""
    body = {"temperature": 0, "top_p": 0.5, "min_p": 0.25, "top_k": 7, "max_tokens": 9, "n": 3,
            "stop": ["a", "bc"], "seed": 11}
    p = sampling_params(body, 16)
    assert p == SamplingParams(temperature=0.0, top_p=0.5, min_p=0.25, top_k=7, max_tokens=9, n=3,
                               stop=["a", "bc"], seed=11)
    assert isinstance(p.temperature, float)
    assert sampling_params({"top_k": -1}, 1).top_k == 0
    assert sampling_params({"top_k": 0}, 1).top_k == 0
    assert sampling_params({"top_k": 1}, 1).top_k == 1
    p = sampling_params({"max_completion_tokens": 5, "max_tokens": 99}, None, "max_completion_tokens")
    assert p.max_tokens == 5


def test_temperature_bounds():
    """Kills: `> 100` -> `>= 100` or the constant / message changed; the type check dropped or
    its message changed; the engine's own checks (via SamplingError) losing their param."""
    assert sampling_params({"temperature": 100}, 1).temperature == 100.0
    assert sampling_params({"temperature": 0}, 1).temperature == 0.0
    refusal(sampling_params, {"temperature": 100.5}, 1, param="temperature", message="temperature: must be <= 100")
    refusal(sampling_params, {"temperature": -0.1}, 1, param="temperature",
            message="temperature=-0.1: must be a number >= 0 (0 = greedy)")
    for name in ("temperature", "top_p", "min_p"):
        for v in ("hot", True, [1]):
            refusal(sampling_params, {name: v}, 1, param=name, message=f"{name}: must be a number, got {v!r}")


def test_top_p_and_min_p_bounds_come_from_sampling_params():
    """Kills: SamplingError's param cut wrongly (`split("=", 1)[0]` mutated), its message
    rewritten, or the error escaping as a traceback."""
    assert sampling_params({"top_p": 1}, 1).top_p == 1.0
    assert sampling_params({"min_p": 1}, 1).min_p == 1.0
    refusal(sampling_params, {"top_p": 0}, 1, param="top_p", message="top_p=0: must be in (0, 1]")
    refusal(sampling_params, {"top_p": 1.5}, 1, param="top_p", message="top_p=1.5: must be in (0, 1]")
    refusal(sampling_params, {"min_p": 2}, 1, param="min_p", message="min_p=2: must be in [0, 1]")
    refusal(sampling_params, {"min_p": -0.5}, 1, param="min_p", message="min_p=-0.5: must be in [0, 1]")


def test_top_k_bounds():
    """Kills: `< -1` -> `<= -1` or `< 0` (OpenAI-style -1 = off refused), the int check dropped."""
    assert sampling_params({"top_k": -1}, 1).top_k == 0
    for v in (-2, 1.5, True, "3"):
        refusal(sampling_params, {"top_k": v}, 1, param="top_k",
                message=f"top_k: must be an integer >= 0 (0 or -1 = off), got {v!r}")


def test_max_tokens_bounds():
    """Kills: `lowest` swapped (0 allowed without echo, or refused with it), `< lowest` ->
    `<=`, the int check dropped, the field name not used in the message, prompt_logprobs (set
    so the engine accepts max_tokens 0) not passed or not reset afterwards."""
    assert sampling_params({"max_tokens": 1}, 16).max_tokens == 1
    refusal(sampling_params, {"max_tokens": 0}, 16, param="max_tokens",
            message="max_tokens: must be an integer >= 1, got 0")
    p = sampling_params({"max_tokens": 0}, 16, allow_zero_tokens=True)
    assert (p.max_tokens, p.prompt_logprobs) == (0, False)
    refusal(sampling_params, {"max_tokens": -1}, 16, allow_zero_tokens=True, param="max_tokens",
            message="max_tokens: must be an integer >= 0, got -1")
    for v in (2.5, "3", True):
        refusal(sampling_params, {"max_tokens": v}, 16, param="max_tokens",
                message=f"max_tokens: must be an integer >= 1, got {v!r}")
    refusal(sampling_params, {"max_completion_tokens": 0}, None, "max_completion_tokens", param="max_completion_tokens",
            message="max_completion_tokens: must be an integer >= 1, got 0")


def test_n_bounds():
    """Kills: `1 <= n` -> `<`, `n <= MAX_N` -> `<`, MAX_N changed, the int check dropped."""
    assert protocol.MAX_N == 64
    assert sampling_params({"n": 1}, 1).n == 1
    assert sampling_params({"n": 64}, 1).n == 64
    for v in (0, 65, -1, 2.0, True, "3"):
        refusal(sampling_params, {"n": v}, 1, param="n", message=f"n: must be an integer in [1, 64], got {v!r}")


def test_stop_strings():
    """Kills: a string not wrapped in a list, empty strings not dropped (or dropped after the
    count), the type check's `or` / `all` mutated, MAX_STOPS / MAX_STOP_CHARS bounds moved by
    one or their messages changed."""
    assert sampling_params({"stop": "ab"}, 1).stop == ["ab"]
    assert sampling_params({"stop": ""}, 1).stop == []
    assert sampling_params({"stop": ["a", "", "b"]}, 1).stop == ["a", "b"]
    sixteen = [f"s{i}" for i in range(16)]
    assert sampling_params({"stop": sixteen + ["", ""]}, 1).stop == sixteen
    refusal(sampling_params, {"stop": sixteen + ["x"]}, 1, param="stop", message="stop: at most 16 stop strings")
    assert sampling_params({"stop": ["s" * 1024]}, 1).stop == ["s" * 1024]
    refusal(sampling_params, {"stop": ["a", "s" * 1025]}, 1, param="stop",
            message="stop: a stop string has at most 1024 characters")
    refusal(sampling_params, {"stop": "s" * 1025}, 1, param="stop",
            message="stop: a stop string has at most 1024 characters")
    for v in (5, ["a", 5], {"a": 1}, [None]):
        refusal(sampling_params, {"stop": v}, 1, param="stop", message="stop: must be a string or a list of strings")


def test_seed_bounds():
    """Kills: `0 <= seed` -> `<`, `< 2**32` -> `<=`, the int check dropped (a bool or a string
    accepted), `seed is not None` inverted."""
    assert sampling_params({"seed": 0}, 1).seed == 0
    assert sampling_params({"seed": 2**32 - 1}, 1).seed == 2**32 - 1
    assert sampling_params({"seed": None}, 1).seed is None
    for v in (-1, 2**32, "abc", True, 1.0):
        refusal(sampling_params, {"seed": v}, 1, param="seed",
                message=f"seed: must be an integer in [0, 2**32) or null, got {v!r}")


def test_stream_flags():
    """Kills: the stream default changed, include_usage's default changed, the options check
    `or` -> `and`, `opts and not stream` mutated (an empty options map refused without a
    stream, or options accepted without one), each message changed."""
    assert stream_flags({}) == (False, False)
    assert stream_flags({"stream": None, "stream_options": None}) == (False, False)
    assert stream_flags({"stream": False, "stream_options": {}}) == (False, False)
    assert stream_flags({"stream": True}) == (True, False)
    assert stream_flags({"stream": True, "stream_options": {}}) == (True, False)
    assert stream_flags({"stream": True, "stream_options": {"include_usage": True}}) == (True, True)
    assert stream_flags({"stream": True, "stream_options": {"include_usage": False}}) == (True, False)
    for v in ("yes", 1, 0):
        refusal(stream_flags, {"stream": v}, param="stream", message="stream: must be true or false")
    for opts in ({"include_usage": True, "x": 1}, {"continuous_usage_stats": True}, [], "include_usage"):
        refusal(stream_flags, {"stream": True, "stream_options": opts}, param="stream_options",
                message='stream_options: only {"include_usage": bool} is supported')
    refusal(stream_flags, {"stream_options": {"include_usage": True}}, param="stream_options",
            message="stream_options: only allowed with stream: true")
    refusal(stream_flags, {"stream": False, "stream_options": {"include_usage": False}}, param="stream_options",
            message="stream_options: only allowed with stream: true")
    refusal(stream_flags, {"stream": True, "stream_options": {"include_usage": 1}}, param="stream_options",
            message="stream_options: include_usage must be true or false")


# --------------------------------------------------------------------------- messages


def test_messages_are_normalised_to_role_and_string_content():
    """Kills: developer not mapped to system, text parts not joined in order (or joined with a
    separator), extra keys (name) kept, a message dropped."""
    msgs = [{"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}],
             "name": "bob"},
            {"role": "assistant", "content": ""}, {"role": "user", "content": []}]
    assert normalize_messages(msgs) == [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Hi there"},
                                        {"role": "assistant", "content": ""}, {"role": "user", "content": ""}]


@pytest.mark.parametrize("messages,message", [
    (None, "messages: required"),
    ([], "messages: must be a non-empty list of {role, content} objects"),
    ("hi", "messages: must be a non-empty list of {role, content} objects"),
    ({"role": "user", "content": "x"}, "messages: must be a non-empty list of {role, content} objects"),
    ([{"role": "user", "content": "x"}, "hi"], "messages[1]: must be an object with role and content"),
    ([{"content": "x"}], "messages[0]: needs a string 'role'"),
    ([{"role": 3, "content": "x"}], "messages[0]: needs a string 'role'"),
    ([{"role": "user"}], "messages[0]: needs a string 'content'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": None}],
     "messages[1]: needs a string 'content'"),
    ([{"role": "user", "content": 5}], "messages[0]: needs a string 'content'"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages[0].content: only text parts are supported"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}],
     "messages[0].content: only text parts are supported"),
    ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content: only text parts are supported"),
    ([{"role": "user", "content": ["hello"]}], "messages[0].content: only text parts are supported"),
])
def test_malformed_messages_are_refused(messages, message):
    """Kills: `or not messages` -> `and` (an empty list or a string accepted), the index left
    out of the message, each `and` of the text-part check turned into `or`, changed messages."""
    refusal(normalize_messages, messages, param="messages", message=message)


# --------------------------------------------------------------------------- Parser basics


class Pieces:
    """A tokenizer that only lists its pieces (the longest is the last one)."""

    vocab_size = 3

    def id_to_piece(self, i: int) -> str:
        return ["ab", "a", "abcde"][i]


class Unlisted:
    """A tokenizer that cannot list its pieces and has no chat control tokens."""

    vocab_size = 10

    def id_to_piece(self, i: int) -> str:
        raise RuntimeError("no pieces")


def test_longest_piece_and_max_chars():
    """Kills: the default changed, `max` -> `min`, the last piece not looked at, the factor 2 or
    max_len dropped from max_chars."""
    assert longest_piece(Pieces()) == 5
    assert longest_piece(Unlisted()) == 64
    assert longest_piece(Unlisted(), default=9) == 9
    assert longest_piece(TOK) == LONGEST == max(len(TOK.id_to_piece(i)) for i in range(TOK.vocab_size))
    assert Parser(Pieces(), "m", 10, 3, bos=True).max_chars == 2 * 10 * 5
    assert Parser(TOK, "m", MAX_LEN, VOCAB, bos=True).max_chars == MAX_CHARS


def test_parser_keeps_its_settings_and_finds_the_turn_token(parser):
    """Kills: an argument of Parser stored under the wrong name or dropped, the turn id lookup
    mutated (None for a chat tokenizer, or a tokenizer without it crashing the constructor)."""
    assert (parser.tokenizer, parser.model_name, parser.max_len, parser.vocab_size, parser.bos) == \
        (TOK, "tiny", MAX_LEN, VOCAB, True)
    assert parser.turn_id == TURN == 5
    assert Parser(Unlisted(), "m", 10, 10, bos=False).turn_id is None


def test_check_model(parser):
    """Kills: an absent model refused, the 404 / code / message changed, the names tuple
    ignored (a second served name refused) or joined differently."""
    for body in ({}, {"model": None}, {"model": "tiny"}):
        parser.check_model(body)
    parser.check_model({"model": "tiny-reward"}, ("tiny", "tiny-reward"))
    refusal(parser.check_model, {"model": "gpt-4"}, status=404, param="model", code="model_not_found",
            message="model 'gpt-4' does not exist; this server serves 'tiny'")
    refusal(parser.check_model, {"model": "x"}, ("tiny", "tiny-reward"), status=404, param="model",
            code="model_not_found", message="model 'x' does not exist; this server serves 'tiny', 'tiny-reward'")


def test_check_text_bound_is_exact(parser):
    """Kills: `>` -> `>=`, the code or the param dropped, the message's numbers changed."""
    text = "a" * MAX_CHARS
    assert parser.check_text(text, "prompt") is text
    refusal(parser.check_text, text + "a", "messages", param="messages", code="context_length_exceeded",
            message=f"messages: {MAX_CHARS + 1} characters cannot fit this server's context of {MAX_LEN} tokens "
                    f"(at most {MAX_CHARS} characters are accepted)")


def test_check_prompt_ids_bounds(parser):
    """Kills: the empty check dropped, `>= max_len` -> `>` (a prompt that leaves no room for a
    token accepted), `0 <= t` -> `<`, `t < vocab_size` -> `<=`, `[:5]` changed, messages."""
    refusal(parser.check_prompt_ids, [], "prompt", param="prompt", message="prompt: the prompt is empty")
    fits = list(range(MAX_LEN - 1))
    assert parser.check_prompt_ids(fits, "prompt") == fits
    refusal(parser.check_prompt_ids, list(range(MAX_LEN)), "messages", param="messages",
            message=too_long(MAX_LEN, "messages"))
    assert parser.check_prompt_ids([0, VOCAB - 1], "prompt") == [0, VOCAB - 1]
    refusal(parser.check_prompt_ids, [1, -1, VOCAB, 2], "prompt", param="prompt",
            message=f"prompt: token ids [-1, {VOCAB}] outside the vocabulary [0, {VOCAB})")
    refusal(parser.check_prompt_ids, [-1, -2, -3, -4, -5, -6, 7], "prompt", param="prompt",
            message=f"prompt: token ids [-1, -2, -3, -4, -5] outside the vocabulary [0, {VOCAB})")
    # the length is checked before each id is looked at
    refusal(parser.check_prompt_ids, [-1] * MAX_LEN, "prompt", param="prompt", message=too_long(MAX_LEN))


def test_check_room_bound_is_exact(parser):
    """Kills: `>` -> `>=` (a request that exactly fills the context refused), `max` -> `min`
    over the prompts, the field name or the numbers in the message changed, the code dropped."""
    prompts = [[1] * 3, [1] * 10, [1] * 5]
    parser.check_room(prompts, SamplingParams(max_tokens=MAX_LEN - 10), "max_tokens")
    refusal(parser.check_room, prompts, SamplingParams(max_tokens=MAX_LEN - 9), "max_completion_tokens",
            param="max_completion_tokens", code="context_length_exceeded",
            message=f"max_completion_tokens: the context is {MAX_LEN} tokens; the prompt has 10 and "
                    f"max_completion_tokens={MAX_LEN - 9} asks for more than the {MAX_LEN - 10} left; "
                    f"lower max_completion_tokens or shorten the prompt")


def test_job_samples():
    """Kills: `*` -> `+` or `/` in Job.samples."""
    params = SamplingParams(n=3)
    job = Job("x", "completion", [Request("a", [1], params), Request("b", [1], params)], params, False, False, False)
    assert job.samples == 6
    assert (job.top_logprobs, job.echo, job.prompt_texts) == (0, False, [])
    assert abs(job.created - time.time()) < 5


# --------------------------------------------------------------------------- log-probs


def test_chat_logprobs_fields(parser):
    """Chat: `logprobs` is a bool and `top_logprobs` (0-20) needs it. Kills: the bounds moved by
    one, `top and not v` mutated, the bool check dropped (1 accepted), the default 0 changed."""
    for body, want in (({}, (False, 0)), ({"logprobs": False}, (False, 0)), ({"logprobs": True}, (True, 0)),
                       ({"logprobs": True, "top_logprobs": 20}, (True, 20)),
                       ({"logprobs": True, "top_logprobs": 0}, (True, 0)),
                       ({"logprobs": None, "top_logprobs": None}, (False, 0)),
                       ({"logprobs": False, "top_logprobs": 0}, (False, 0))):
        assert parser._top_logprobs(body, chat=True) == want, body
    for v in (1, 0, "true"):
        refusal(parser._top_logprobs, {"logprobs": v}, chat=True, param="logprobs",
                message="logprobs: must be true or false")
    for v in (21, -1, 2.0, True):
        refusal(parser._top_logprobs, {"logprobs": True, "top_logprobs": v}, chat=True, param="top_logprobs",
                message="top_logprobs: must be an integer in [0, 20]")
    for body in ({"top_logprobs": 3}, {"logprobs": False, "top_logprobs": 1}):
        refusal(parser._top_logprobs, body, chat=True, param="top_logprobs",
                message="top_logprobs: needs logprobs: true")


def test_completion_logprobs_field(parser):
    """Completions: `logprobs` is null or an int k in 0-20 (0 = the chosen tokens' log-probs
    only). Kills: 0 read as "off", the bounds moved by one, a bool accepted as an int."""
    for body, want in (({}, (False, 0)), ({"logprobs": None}, (False, 0)), ({"logprobs": 0}, (True, 0)),
                       ({"logprobs": 20}, (True, 20)), ({"logprobs": 3}, (True, 3))):
        assert parser._top_logprobs(body, chat=False) == want, body
    for v in (21, -1, True, False, 1.5, "2"):
        refusal(parser._top_logprobs, {"logprobs": v}, chat=False, param="logprobs",
                message="logprobs: must be an integer in [0, 20] or null")


# --------------------------------------------------------------------------- completions


def test_a_full_completion_request(parser):
    """Every field of a completion parsed into its Job. Kills: a value read from the wrong
    field or not passed on (echo, stream, include_usage, logprobs, the sampling fields),
    prompt_logprobs not `echo and logprobs`, bos dropped, the id prefix or the request ids
    changed, requests not streaming to the worker."""
    body = {"model": "tiny", "prompt": "Hello world", "max_tokens": 5, "n": 2, "stop": "x", "seed": 7,
            "temperature": 0.5, "top_p": 0.9, "top_k": 3, "min_p": 0.1, "logprobs": 3, "echo": True,
            "stream": True, "stream_options": {"include_usage": True}, "best_of": 2, "user": "u1"}
    job = parser.completion(body)
    assert re.fullmatch(r"cmpl-[0-9a-f]{32}", job.id)
    assert (job.kind, job.stream, job.include_usage, job.logprobs, job.top_logprobs, job.echo, job.prompt_texts) == \
        ("completion", True, True, True, 3, True, ["Hello world"])
    assert job.params == SamplingParams(temperature=0.5, top_p=0.9, top_k=3, min_p=0.1, max_tokens=5, stop=["x"],
                                        seed=7, n=2, logprobs=True, top_logprobs=3, prompt_logprobs=True)
    [req] = job.requests
    assert (req.id, req.prompt_ids, req.params, req.stream) == \
        (f"{job.id}-0", [BOS] + TOK.encode("Hello world"), job.params, True)
    assert job.samples == 2 and abs(job.created - time.time()) < 5


def test_completion_defaults(parser):
    """Kills: the default max_tokens (16, as OpenAI's) changed, echo / stream / logprobs on by
    default, prompt_logprobs on without logprobs or without echo (`and` -> `or`)."""
    job = parser.completion({"prompt": "Hi"})
    assert job.params == SamplingParams(max_tokens=16)
    assert (job.stream, job.include_usage, job.logprobs, job.top_logprobs, job.echo) == (False, False, False, 0, False)
    assert parser.completion({"prompt": "Hi", "echo": True}).params.prompt_logprobs is False
    assert parser.completion({"prompt": "Hi", "logprobs": 0}).params.prompt_logprobs is False
    assert parser.completion({"prompt": "Hi", "echo": True, "logprobs": 0}).params.prompt_logprobs is True
    assert parser.completion({"prompt": "Hi", "echo": None, "suffix": None, "best_of": None}).echo is False


def test_completion_max_tokens_zero_only_with_echo(parser):
    """Scoring a prompt: `echo` + max_tokens 0. Kills: allow_zero_tokens not tied to echo."""
    job = parser.completion({"prompt": "Hi", "echo": True, "logprobs": 0, "max_tokens": 0})
    assert (job.params.max_tokens, job.params.prompt_logprobs) == (0, True)
    refusal(parser.completion, {"prompt": "Hi", "max_tokens": 0}, param="max_tokens",
            message="max_tokens: must be an integer >= 1, got 0")


def test_completion_room_in_the_context(parser):
    """Kills: check_room not called for completions, or with the wrong field name."""
    ids = [BOS] + TOK.encode("Hello world")
    parser.completion({"prompt": "Hello world", "max_tokens": MAX_LEN - len(ids)})
    refusal(parser.completion, {"prompt": "Hello world", "max_tokens": MAX_LEN - len(ids) + 1}, param="max_tokens",
            code="context_length_exceeded",
            message=f"max_tokens: the context is {MAX_LEN} tokens; the prompt has {len(ids)} and "
                    f"max_tokens={MAX_LEN - len(ids) + 1} asks for more than the {MAX_LEN - len(ids)} left; "
                    f"lower max_tokens or shorten the prompt")


@pytest.mark.parametrize("body,status,param,message", [
    ({"max_tokens": 5}, 400, "prompt", "prompt: required"),
    ({"prompt": None}, 400, "prompt", "prompt: required"),
    ({"prompt": "x", "echo": "yes"}, 400, "echo", "echo: must be true or false"),
    ({"prompt": "x", "echo": 1}, 400, "echo", "echo: must be true or false"),
    ({"prompt": "x", "suffix": "end"}, 400, "suffix", "suffix: not supported"),
    ({"prompt": "x", "suffix": ""}, 400, "suffix", "suffix: not supported"),
    ({"prompt": "x", "best_of": 2}, 400, "best_of", "best_of: only null or equal to n is supported"),
    ({"prompt": "x", "n": 2, "best_of": 3}, 400, "best_of", "best_of: only null or equal to n is supported"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model", "model 'gpt-4' does not exist; this server serves 'tiny'"),
    ({"prompt": "x", "messages": USER}, 400, "messages",
     "messages: unrecognized request argument (not supported by this server)"),
    ({"prompt": "x", "frequency_penalty": 1}, 400, "frequency_penalty", "frequency_penalty: only 0 is supported"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream", "stream: must be true or false"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs", "logprobs: must be an integer in [0, 20] or null"),
])
def test_completion_refusals(parser, body, status, param, message):
    """Each completion-level check reached through `completion` (kills a check dropped from it)."""
    err = refusal(parser.completion, body, status=status, param=param, message=message,
                  code="model_not_found" if status == 404 else None)
    assert err.body()["error"]["param"] == param


def test_best_of_equal_to_n_is_accepted(parser):
    """Kills: `best_of != params.n` -> `==`, or compared with the default n."""
    assert parser.completion({"prompt": "x", "n": 3, "best_of": 3}).params.n == 3
    assert parser.completion({"prompt": "x", "best_of": 1}).params.n == 1


def test_prompt_forms(parser):
    """A string, a list of strings, a list of ids, a list of id lists. Kills: the branches of
    `_prompts` swapped or merged (a list of ids read as several prompts), bos not prepended to
    text (or prepended to ids), the echo texts not the prompts as given / decoded."""
    enc = [BOS] + TOK.encode("Once upon a time")
    job = parser.completion({"prompt": "Once upon a time"})
    assert [r.prompt_ids for r in job.requests] == [enc] and job.prompt_texts == ["Once upon a time"]
    job = parser.completion({"prompt": ["Hi", "Once upon a time"]})
    assert [r.prompt_ids for r in job.requests] == [[BOS] + TOK.encode("Hi"), enc]
    assert job.prompt_texts == ["Hi", "Once upon a time"]
    assert [r.id for r in job.requests] == [f"{job.id}-0", f"{job.id}-1"]
    job = parser.completion({"prompt": [4072, 385, 323]})
    assert [r.prompt_ids for r in job.requests] == [[4072, 385, 323]]
    assert job.prompt_texts == [TOK.decode([4072, 385, 323])] == ["Hello"]
    job = parser.completion({"prompt": [[7, 8], [0, VOCAB - 1, 9]]})
    assert [r.prompt_ids for r in job.requests] == [[7, 8], [0, VOCAB - 1, 9]]
    assert job.prompt_texts == [TOK.decode([7, 8]), TOK.decode([0, VOCAB - 1, 9])]
    no_bos = Parser(TOK, "tiny", MAX_LEN, VOCAB, bos=False)
    assert no_bos.completion({"prompt": "Once upon a time"}).requests[0].prompt_ids == enc[1:]
    assert no_bos.completion({"prompt": [7, 8]}).requests[0].prompt_ids == [7, 8]


@pytest.mark.parametrize("prompt", [[], 5, {"a": 1}, [[]], [[1], []], [1.5], [[1.5]], [True], [[1, "a"]],
                                    ["a", [1]], [[1], "a"], [None], [[None]]])
def test_malformed_prompts_are_refused_with_the_shape_message(parser, prompt):
    """Kills: the `and prompt` emptiness checks dropped, `_is_int` on each id dropped, mixed
    strings and id lists accepted, a shape error turned into a traceback."""
    refusal(parser.completion, {"prompt": prompt}, param="prompt", message=SHAPE)


def test_prompt_length_is_checked_before_the_ids_are_walked(parser):
    """A long token-id prompt is refused by its length without walking its ids. Kills:
    `len(p) < max_len` -> `<=` (a max_len-long list of junk gets the shape message instead)."""
    refusal(parser.completion, {"prompt": [[1.5] * MAX_LEN]}, param="prompt", message=too_long(MAX_LEN))
    refusal(parser.completion, {"prompt": [[1.5] * (MAX_LEN - 1)]}, param="prompt", message=SHAPE)
    refusal(parser.completion, {"prompt": list(range(MAX_LEN))}, param="prompt", message=too_long(MAX_LEN))
    refusal(parser.completion, {"prompt": [[5, VOCAB]]}, param="prompt",
            message=f"prompt: token ids [{VOCAB}] outside the vocabulary [0, {VOCAB})")


def test_text_prompts_are_bounded_before_and_after_tokenizing(parser):
    """Kills: check_text skipped for a list of strings, check_prompt_ids skipped for text (a
    prompt of more tokens than the context accepted)."""
    refusal(parser.completion, {"prompt": ["x", "a" * (MAX_CHARS + 1)]}, param="prompt", code="context_length_exceeded",
            message=f"prompt: {MAX_CHARS + 1} characters cannot fit this server's context of {MAX_LEN} tokens "
                    f"(at most {MAX_CHARS} characters are accepted)")
    words = "word " * 60
    n = 1 + len(TOK.encode(words))
    assert n >= MAX_LEN
    refusal(parser.completion, {"prompt": ["x", words]}, param="prompt", message=too_long(n))


def test_prompts_times_n_bound_is_exact(parser):
    """Kills: `>` -> `>=` on MAX_SAMPLES, `*` -> `+` / `/`, n not passed to _prompts, the
    constant or the message changed."""
    assert protocol.MAX_SAMPLES == 256
    assert parser.completion({"prompt": [[5]] * 256, "max_tokens": 1}).samples == 256
    assert parser.completion({"prompt": [[5]] * 64, "n": 4, "max_tokens": 1}).samples == 256
    refusal(parser.completion, {"prompt": [[5]] * 257, "max_tokens": 1}, param="prompt",
            message="prompt: 257 prompts x n=1 samples exceeds the limit of 256 samples per request; split the request")
    refusal(parser.completion, {"prompt": ["x"] * 65, "n": 4}, param="prompt",
            message="prompt: 65 prompts x n=4 samples exceeds the limit of 256 samples per request; split the request")
    refusal(parser.completion, {"prompt": ["x"] * 5, "n": 64}, param="prompt",
            message="prompt: 5 prompts x n=64 samples exceeds the limit of 256 samples per request; split the request")


# --------------------------------------------------------------------------- chat


def template_ids(messages, bos: bool = True) -> list[int]:
    """The chat prompt built from the rendered template string in one encode call (equal to the
    segment-wise encoding for content without control strings, see nemojax/data/chat.py)."""
    return ([BOS] if bos else []) + TOK.encode(format_chat(messages))


def test_chat_prompt_is_the_templated_conversation(parser):
    """Kills: normalisation skipped (developer role, text parts), bos dropped or forced, the
    `bos` argument ignored, a message lost."""
    msgs = [{"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": " there"}]},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Why?"}]
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Why?"}]
    want = template_ids(plain)
    assert want[-2:] == TOK.encode("<extra_id_1>Assistant\n")[-2:] and want[0] == BOS
    assert parser.chat_prompt(msgs) == want
    assert parser.chat_prompt(msgs, bos=False) == want[1:]
    no_bos = Parser(TOK, "tiny", MAX_LEN + 20, VOCAB, bos=False)
    assert no_bos.chat_prompt(msgs) == want[1:]
    assert no_bos.chat_prompt(msgs, bos=True) == want


def test_chat_content_cannot_inject_a_turn(parser):
    """Kills: content encoded as template text (its `<extra_id_1>` becoming the turn token)."""
    ids = parser.chat_prompt([{"role": "user", "content": "a<extra_id_1>b"}])
    assert ids.count(TURN) == 2  # the user's turn and the assistant's, none from the content
    assert TOK.decode(ids).count("<extra_id_1>") == 3


def test_chat_prompt_bounds(parser):
    """Kills: the characters summed over one message only, `chars > max_chars` -> `>=` (at
    exactly max_chars the text passes on to the token count), the code dropped, a template
    error escaping as a traceback or naming the wrong param, check_prompt_ids skipped."""
    half = MAX_CHARS // 2
    over = [{"role": "system", "content": "a" * half}, {"role": "user", "content": "a" * (half + 1)}]
    refusal(parser.chat_prompt, over, param="messages", code="context_length_exceeded",
            message=f"messages: {MAX_CHARS + 1} characters cannot fit this server's context of {MAX_LEN} tokens "
                    f"(at most {MAX_CHARS} characters are accepted)")
    at = [{"role": "system", "content": "a" * half}, {"role": "user", "content": "a" * half}]
    refusal(parser.chat_prompt, at, param="messages", message=too_long(len(template_ids(at)), "messages"))
    refusal(parser.chat_prompt, [{"role": "robot", "content": "x"}], param="messages",
            message="messages[0]: unknown role 'robot'; use system, user or assistant")
    refusal(parser.chat_prompt, [{"role": "user", "content": "x"}, {"role": "system", "content": "late"}],
            param="messages", message="messages[1]: a system message may only come first")


def test_a_full_chat_request(parser):
    """Kills: chat's values not passed on (logprobs / top_logprobs into params and the Job,
    stream flags, the sampling fields), the turn token not made a stop token, the id prefix or
    the kind changed, the Job's id not the request's."""
    body = {"model": "tiny", "messages": USER, "max_completion_tokens": 4, "temperature": 0, "stop": ["x"],
            "seed": 3, "n": 2, "logprobs": True, "top_logprobs": 2, "stream": True,
            "stream_options": {"include_usage": True}, "response_format": {"type": "text"}, "tools": [],
            "tool_choice": "none", "function_call": None, "user": "u"}
    job = parser.chat(body)
    [req] = job.requests
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{32}", job.id) and req.id == job.id
    assert (job.kind, job.stream, job.include_usage, job.logprobs, job.top_logprobs, job.echo, job.prompt_texts) == \
        ("chat", True, True, True, 2, False, [])
    assert job.params == SamplingParams(temperature=0.0, max_tokens=4, stop=["x"], stop_token_ids=[TURN], seed=3, n=2,
                                        logprobs=True, top_logprobs=2)
    assert (req.prompt_ids, req.params, req.stream) == (template_ids(USER), job.params, True)


def test_chat_defaults_fill_the_context(parser):
    """Chat's default max_tokens is the room left. Kills: `max_len - len(ids)` mutated, the
    default applied when max_tokens was given (`explicit` inverted), logprobs on by default."""
    room = MAX_LEN - len(template_ids(USER))
    job = parser.chat({"messages": USER})
    assert job.params == SamplingParams(max_tokens=room, stop_token_ids=[TURN])
    assert (job.stream, job.include_usage, job.logprobs, job.top_logprobs) == (False, False, False, 0)
    assert parser.chat({"messages": USER, "max_tokens": 3}).params.max_tokens == 3
    assert parser.chat({"messages": USER, "max_tokens": None, "max_completion_tokens": None}).params.max_tokens == room


@pytest.mark.parametrize("field_name", ["max_tokens", "max_completion_tokens"])
def test_chat_room_bound_is_exact(parser, field_name):
    """Kills: check_room skipped for an explicit max_tokens, the field name not passed on."""
    n = len(template_ids(USER))
    assert parser.chat({"messages": USER, field_name: MAX_LEN - n}).params.max_tokens == MAX_LEN - n
    refusal(parser.chat, {"messages": USER, field_name: MAX_LEN - n + 1}, param=field_name,
            code="context_length_exceeded",
            message=f"{field_name}: the context is {MAX_LEN} tokens; the prompt has {n} and "
                    f"{field_name}={MAX_LEN - n + 1} asks for more than the {MAX_LEN - n} left; "
                    f"lower {field_name} or shorten the prompt")


@pytest.mark.parametrize("extra,status,param,message", [
    ({"max_tokens": 5, "max_completion_tokens": 5}, 400, "max_completion_tokens",
     "max_completion_tokens: give max_tokens or max_completion_tokens, not both"),
    ({"max_completion_tokens": 0}, 400, "max_completion_tokens",
     "max_completion_tokens: must be an integer >= 1, got 0"),
    ({"max_tokens": 0}, 400, "max_tokens", "max_tokens: must be an integer >= 1, got 0"),
    ({"tools": [{"type": "function"}]}, 400, "tools", "tools: tool / function calling is not supported"),
    ({"functions": [{"name": "f"}]}, 400, "functions", "functions: tool / function calling is not supported"),
    ({"tool_choice": "auto"}, 400, "tool_choice", "tool_choice: tool / function calling is not supported"),
    ({"function_call": "auto"}, 400, "function_call", "function_call: tool / function calling is not supported"),
    ({"response_format": {"type": "json_object"}}, 400, "response_format",
     'response_format: only {"type": "text"} is supported'),
    ({"response_format": "text"}, 400, "response_format", 'response_format: only {"type": "text"} is supported'),
    ({"top_logprobs": 3}, 400, "top_logprobs", "top_logprobs: needs logprobs: true"),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options",
     "stream_options: only allowed with stream: true"),
    ({"prompt": "x"}, 400, "prompt", "prompt: unrecognized request argument (not supported by this server)"),
    ({"echo": True}, 400, "echo", "echo: unrecognized request argument (not supported by this server)"),
    ({"presence_penalty": 0.5}, 400, "presence_penalty", "presence_penalty: only 0 is supported"),
    ({"model": "gpt-4"}, 404, "model", "model 'gpt-4' does not exist; this server serves 'tiny'"),
    ({"messages": None}, 400, "messages", "messages: required"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "late"}]}, 400, "messages",
     "messages[1]: a system message may only come first"),
])
def test_chat_refusals(parser, extra, status, param, message):
    """Each chat-level check reached through `chat` (kills a check dropped from it, the tool
    names' strings mutated, `not in (None, "none")` changed)."""
    refusal(parser.chat, {"messages": USER, **extra}, status=status, param=param, message=message,
            code="model_not_found" if status == 404 else None)


def test_chat_accepts_the_neutral_tool_and_format_values(parser):
    """Kills: an empty tools list, tool_choice "none" / null or response_format text refused."""
    for extra in ({"tools": []}, {"functions": None}, {"tool_choice": "none"}, {"function_call": "none"},
                  {"tool_choice": None}, {"response_format": {"type": "text"}}, {"response_format": None},
                  {"max_tokens": None, "max_completion_tokens": 3}, {"max_tokens": 3, "max_completion_tokens": None}):
        assert parser.chat({"messages": USER, **extra}).kind == "chat", extra


class NoChatPieces:
    """The builtin tokenizer without the chat control tokens (a completion-only tokenizer)."""

    def __init__(self, tok) -> None:
        self._tok = tok

    def special_id(self, piece: str) -> int:
        raise TokenizerError(f"tok.model has no piece {piece!r}")

    def __getattr__(self, name: str):
        return getattr(self._tok, name)


def test_a_tokenizer_without_chat_tokens_refuses_chat_but_serves_completions():
    """A server whose tokenizer has no `<extra_id_*>` pieces cannot build a chat prompt: chat is
    a 400 naming messages (vLLM answers a model without a chat template the same way), not a
    500 with a traceback in the log. Completions work. Kills: the TokenizerError not caught."""
    p = Parser(NoChatPieces(TOK), "tiny", MAX_LEN, VOCAB, bos=True)
    assert p.turn_id is None
    assert p.completion({"prompt": "Hi"}).requests[0].prompt_ids == [BOS] + TOK.encode("Hi")
    refusal(p.chat, {"messages": USER}, param="messages",
            message="messages: this server's tokenizer has no chat control tokens (tok.model has no piece "
                    "'<extra_id_0>'); send a formatted prompt to /v1/completions instead")
