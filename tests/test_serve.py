"""The OpenAI-compatible server end to end (FastAPI TestClient, no network) on a tiny random model.

One engine (one length bucket and one decode window, so few compiles) serves every test through
one app; its background worker thread is the one the real server runs. Behaviour is checked
against references that do not go through HTTP: the engine driven directly, the tokenizer and
the chat template.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from nemojax.config import ModelConfig  # noqa: E402
from nemojax.data.chat_template import format_chat  # noqa: E402
from nemojax.data.tokenizer import load_tokenizer  # noqa: E402
from nemojax.inference import Engine, Request, SamplingParams  # noqa: E402
from nemojax.model.transformer import init_model  # noqa: E402
from nemojax.serve import Progress  # noqa: E402
from nemojax.serve.app import create_app  # noqa: E402

MAX_LEN = 64
PROMPTS = ["The quick brown fox", "Once upon a time", "def main():", "In 1905, Einstein"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin")


@pytest.fixture(scope="module")
def engine(tok):
    cfg = ModelConfig(vocab_size=4096, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=16, ffn_hidden_size=256, init_std=0.2, max_seq_len=MAX_LEN)
    model = init_model(cfg, seed=0)
    # min_bucket = max_len: one prefill length bucket and one decode window (compile time dominates)
    return Engine(model, max_slots=4, max_len=MAX_LEN, decode_steps=4, max_prefill_batch=4,
                  min_bucket=MAX_LEN, tokenizer=tok, stop_token_ids=[3])


@pytest.fixture(scope="module")
def client(engine, tok):
    app = create_app(engine, tok, model_name="tiny")
    with TestClient(app) as c:
        yield c


def complete(client, **body):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def chat(client, **body):
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def sse(client, path, body):
    """The JSON payloads of a server-sent event stream, and whether it ended with [DONE]."""
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    return [json.loads(d) for d in data if d != "[DONE]"], data[-1] == "[DONE]"


def test_models_and_health(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["max_model_len"]) for m in models["data"]] == [("tiny", "model", MAX_LEN)]
    h = client.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"


def test_completion_shape_usage_logprobs_and_greedy_determinism(client, engine, tok):
    body = dict(model="tiny", prompt=PROMPTS[0], max_tokens=10, temperature=0, logprobs=0)
    out = complete(client, **body)
    assert out["object"] == "text_completion" and out["model"] == "tiny" and out["id"].startswith("cmpl-")
    assert isinstance(out["created"], int)
    [choice] = out["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] in ("stop", "length")
    prompt_ids = tok.encode(PROMPTS[0], bos=True)
    lp = choice["logprobs"]
    n_out = out["usage"]["completion_tokens"]
    assert out["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": n_out,
                            "total_tokens": len(prompt_ids) + n_out,
                            "prompt_tokens_details": {"cached_tokens": out["usage"]["prompt_tokens_details"]["cached_tokens"]}}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == n_out
    assert "".join(lp["tokens"]) == choice["text"] and all(x <= 0 for x in lp["token_logprobs"])
    assert lp["text_offset"][0] == 0 and lp["top_logprobs"] is None
    # The same request without HTTP: the engine's own greedy sample.
    worker = client.app.state.worker
    [c] = worker.generate([Request("ref", prompt_ids, SamplingParams(temperature=0, max_tokens=10,
                                                                     logprobs=True))])
    assert choice["text"] == c.text == tok.decode(c.output_ids)
    assert lp["token_logprobs"] == pytest.approx(c.logprobs, abs=1e-6)
    # Greedy is deterministic, and a token-id prompt is the same prompt.
    assert complete(client, **body)["choices"][0]["text"] == choice["text"]
    assert complete(client, **{**body, "prompt": prompt_ids})["choices"][0]["text"] == choice["text"]


def test_concurrent_requests_share_decode_steps_and_match_solo_runs(client):
    bodies = [dict(prompt=p, max_tokens=6 + 3 * i, temperature=0) for i, p in enumerate(PROMPTS)]
    solo = [complete(client, **b)["choices"][0]["text"] for b in bodies]
    worker = client.app.state.worker
    worker.pause()  # hold steps until all four requests are queued, so they must share a batch
    worker.stats["max_running"] = 0
    results: dict[int, str] = {}

    def post(i: int) -> None:
        results[i] = complete(client, **bodies[i])["choices"][0]["text"]

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    try:
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while worker.stats["active_requests"] < len(bodies) and time.time() < deadline:
            time.sleep(0.01)
        assert worker.stats["active_requests"] == len(bodies)
    finally:
        worker.resume()
    for t in threads:
        t.join(60)
    assert [results[i] for i in range(len(bodies))] == solo
    assert worker.stats["max_running"] == len(bodies)  # all four decoded in the same steps


def test_stop_strings_cut_the_text(client):
    base = dict(prompt=PROMPTS[1], max_tokens=16, temperature=0)
    full = complete(client, **base)
    text = full["choices"][0]["text"]
    assert len(text) > 12, text
    stop = text[6:9]
    want = text[: text.find(stop)]
    out = complete(client, **base, stop=stop)
    assert out["choices"][0]["text"] == want and out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] < full["usage"]["completion_tokens"]
    other = text[10:12]
    out2 = complete(client, **base, stop=["never appears \u2603", other, stop])
    assert out2["choices"][0]["text"] == text[: min(text.find(stop), text.find(other))]
    # Streaming holds back text that might start a stop string: same result.
    chunks, done = sse(client, "/v1/completions", {**base, "stop": [stop], "stream": True})
    assert done and "".join(c["choices"][0]["text"] for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_n_samples_seeds_and_prompt_lists(client, tok):
    body = dict(prompt=PROMPTS[2], max_tokens=8, temperature=1.0, n=3, seed=7)
    a = complete(client, **body)
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    texts = [c["text"] for c in a["choices"]]
    assert len(set(texts)) == 3  # independent samples
    assert [c["text"] for c in complete(client, **body)["choices"]] == texts  # seeded: reproducible
    assert a["usage"]["prompt_tokens"] == len(tok.encode(PROMPTS[2], bos=True))  # counted once
    # A list of prompts: choice index = prompt index * n + sample index.
    b = complete(client, prompt=PROMPTS[:2], max_tokens=5, temperature=0, n=2, logprobs=0)
    assert [c["index"] for c in b["choices"]] == [0, 1, 2, 3]
    t = [c["text"] for c in b["choices"]]
    assert t[0] == t[1] and t[2] == t[3]  # greedy samples of one prompt agree
    assert t[0] == complete(client, prompt=PROMPTS[0], max_tokens=5, temperature=0)["choices"][0]["text"]
    assert b["usage"]["prompt_tokens"] == sum(len(tok.encode(p, bos=True)) for p in PROMPTS[:2])
    assert b["usage"]["completion_tokens"] == sum(len(c["logprobs"]["tokens"]) for c in b["choices"])
    # top_k=1 samples the argmax whatever the temperature (top_k / min_p extensions reach the engine).
    greedy = complete(client, prompt=PROMPTS[2], max_tokens=8, temperature=0)["choices"][0]["text"]
    k1 = complete(client, prompt=PROMPTS[2], max_tokens=8, temperature=1.5, top_k=1, n=2, seed=1)
    assert [c["text"] for c in k1["choices"]] == [greedy, greedy]
    mp = complete(client, prompt=PROMPTS[2], max_tokens=8, temperature=1.5, min_p=1.0, seed=3)
    assert mp["choices"][0]["text"] == greedy


def test_chat_uses_the_nemotron_template(client, tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    out = chat(client, messages=msgs, max_tokens=12, temperature=0, logprobs=True)
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    [choice] = out["choices"]
    assert choice["message"]["role"] == "assistant"
    prompt = format_chat(msgs, add_generation_prompt=True)
    assert prompt.endswith("<extra_id_1>Assistant\n")
    assert out["usage"]["prompt_tokens"] == len(tok.encode(prompt, bos=True))
    # The same prompt through /v1/completions, stopping at the turn token as chat does.
    ref = complete(client, prompt=prompt, max_tokens=12, temperature=0, stop="<extra_id_1>")["choices"][0]
    content = choice["message"]["content"]
    assert content == (ref["text"].removesuffix("\n") if ref["finish_reason"] == "stop" else ref["text"])
    entries = choice["logprobs"]["content"]
    assert len(entries) == out["usage"]["completion_tokens"]
    assert all(set(e) == {"token", "logprob", "bytes", "top_logprobs"} for e in entries)
    # Content given as text parts, and "developer" as the system role, render the same prompt.
    parts = [{"role": "developer", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    assert chat(client, messages=parts, max_tokens=12, temperature=0)["choices"][0]["message"]["content"] == content
    # Streaming: a role delta first, then content deltas that add up to the same reply.
    chunks, done = sse(client, "/v1/chat/completions",
                       {"messages": msgs, "max_tokens": 12, "temperature": 0, "stream": True,
                        "stream_options": {"include_usage": True}})
    assert done and chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert streamed == content
    no_cache = lambda u: {k: v for k, v in u.items() if k != "prompt_tokens_details"}  # noqa: E731
    assert chunks[-1]["choices"] == [] and no_cache(chunks[-1]["usage"]) == no_cache(out["usage"])
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # the same prompt again
    assert chunks[-2]["choices"][0]["finish_reason"] == choice["finish_reason"]


class TurnTokenIs:
    """The builtin tokenizer, except that token `turn_id` plays <extra_id_1> (a random model
    never emits the real one, so this is how a test sees chat stop at the turn token)."""

    def __init__(self, tok, turn_id: int) -> None:
        self._tok, self._turn = tok, turn_id

    def special_id(self, piece: str) -> int:
        return self._turn if piece == "<extra_id_1>" else self._tok.special_id(piece)

    def __getattr__(self, name: str):
        return getattr(self._tok, name)


def test_chat_stops_at_the_turn_token(client, engine, tok):
    msgs = [{"role": "user", "content": "Tell me a story"}]
    prompt_ids = tok.encode(format_chat(msgs), bos=True)
    [free] = client.app.state.worker.generate([Request("r", prompt_ids, SamplingParams(temperature=0,
                                                                                        max_tokens=10))])
    assert len(free.output_ids) >= 4
    turn = free.output_ids[3]
    cut = free.output_ids[: free.output_ids.index(turn)]
    # A second app over the same engine; the module's app is idle meanwhile (tests run serially).
    with TestClient(create_app(engine, TurnTokenIs(tok, turn), model_name="tiny")) as c2:
        out = chat(c2, messages=msgs, max_tokens=10, temperature=0)
    [choice] = out["choices"]
    assert choice["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] == len(cut)
    assert choice["message"]["content"] == tok.decode(cut).removesuffix("\n")


def test_streamed_completion_equals_the_plain_one(client):
    body = dict(prompt=PROMPTS[3], max_tokens=14, temperature=0, n=2, logprobs=0)
    plain = complete(client, **body)
    chunks, done = sse(client, "/v1/completions", {**body, "stream": True})
    assert done and len(chunks) > 2  # several deltas per sample, not one blob
    for i, want in enumerate(plain["choices"]):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == want["text"]
        assert [c["finish_reason"] for c in mine][-1] == want["finish_reason"]
        # one chunk per token, each with its own log-prob; the last one only finishes
        assert [lp for c in mine[:-1] for lp in c["logprobs"]["token_logprobs"]] == \
            want["logprobs"]["token_logprobs"]
        assert all(len(c["logprobs"]["tokens"]) == 1 for c in mine[:-1]) and mine[-1]["logprobs"] is None
    assert all("usage" not in c for c in chunks)  # only with stream_options.include_usage


LONG = "word " * 100
BAD = [
    ("/v1/completions", {"max_tokens": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -0.1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": -5}, 400, "top_k"),
    ("/v1/completions", {"prompt": "x", "min_p": 2}, 400, "min_p"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "seed": -1}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "echo": "yes"}, 400, "echo"),
    ("/v1/completions", {"prompt": "x", "max_tokens": MAX_LEN}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", '{"prompt": "x", "temperature": 1e999}', 400, "temperature"),
    ("/v1/completions", '{"prompt": "x", "top_p": NaN}', 400, None),
    ("/v1/completions", '{"prompt": "x", "min_p": -Infinity}', 400, None),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "max_tokenz": 5}, 400, "max_tokenz"),
    ("/v1/completions", {"prompt": LONG}, 400, "prompt"),
    ("/v1/completions", {"prompt": list(range(4, 4 + MAX_LEN))}, 400, "prompt"),
    ("/v1/completions", {"prompt": [2, 99999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1.5]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": ["a"] * 5, "n": 64}, 400, "prompt"),
    ("/v1/chat/completions", {"max_tokens": 5}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"},
                                           {"role": "system", "content": "late"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": -3}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     400, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 50,
                              "logprobs": True}, 400, "top_logprobs"),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_requests_get_openai_errors_naming_the_field(client, path, body, status, param):
    if isinstance(body, str):  # raw JSON text (NaN / Infinity / overflow cannot be built as dicts)
        r = client.post(path, content=body.encode(), headers={"Content-Type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]
    assert "Traceback" not in r.text


def test_malformed_bodies_and_unknown_routes(client):
    for raw in (b"{not json", b"[1, 2]", "\u00ff".encode("latin-1")):
        r = client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    assert client.get("/v1/completions").status_code == 405
    assert client.get("/health").json()["status"] == "ok"  # errors left the worker running


def test_worker_cancel_frees_the_slots(client, engine, tok):
    worker = client.app.state.worker
    events = []
    got_progress = threading.Event()

    def callback(ev):
        events.append(ev)
        if isinstance(ev, Progress):
            got_progress.set()

    worker.submit(Request("long", tok.encode(PROMPTS[0], bos=True),
                          SamplingParams(temperature=0, max_tokens=50, n=2)), callback, stream=True)
    assert got_progress.wait(30)
    worker.cancel("long")
    deadline = time.time() + 30
    while worker.stats["active_requests"] and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    assert worker.stats["active_requests"] == 0
    assert complete(client, prompt="x", max_tokens=2)["choices"]  # the server still works
    assert not any(getattr(e, "finish_reason", None) for e in events)  # no completion after cancel


def test_serve_command_and_launcher_help():
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(root / "serve.py"), "--help"], capture_output=True, text=True,
                         cwd=root, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ("--checkpoint", "--host", "--port", "--batch-slots", "--model-name"):
        assert flag in out.stdout


class BrokenEngine:
    """Accepts requests, then fails in its first step (as a device error would)."""

    def __init__(self, tok) -> None:
        self.cfg = ModelConfig(vocab_size=4096, max_seq_len=MAX_LEN)
        self.max_len, self.tokenizer, self.queued = MAX_LEN, tok, []

    has_work = property(lambda self: bool(self.queued))

    def submit(self, request):
        self.queued.append(request)

    def step(self):
        raise RuntimeError("XLA device lost")

    def cancel(self, request_id):
        self.queued = [r for r in self.queued if r.id != request_id]

    def in_flight(self):
        return []


def test_engine_failure_is_a_500_then_503_never_a_traceback(tok):
    with TestClient(create_app(BrokenEngine(tok), tok, model_name="tiny")) as c:
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "XLA device lost" in r.json()["error"]["message"] and "Traceback" not in r.text
        h = c.get("/health")
        assert h.status_code == 503 and "failed" in h.json()["reason"]
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"


def test_full_warm_up_compiles_every_window(engine):
    from nemojax.commands.serve import warm_up

    warm_up(engine, full=True)
    counts = engine.compile_counts()
    # greedy / sampled x with / without top log-probs
    assert counts["decode"] == 4 * len(engine.window_buckets) and counts["copy"] == 1
    assert counts["prefill"] >= len(engine.batch_buckets) * len(engine.chunk_buckets)
    assert set(engine.prefill_shapes()) <= set(engine.programs.statics("prefill")) and engine.pad_to_compiled


def test_serve_command_rejects_a_missing_checkpoint(tmp_path, capsys):
    from nemojax.cli import main

    assert main(["serve", "--checkpoint", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_request_timeout_cancels_the_request_and_answers_504(engine, tok):
    ids = tok.encode("x", bos=True)
    engine.generate_all([Request("warm", ids, SamplingParams(temperature=0, max_tokens=2))])  # compiled first
    with TestClient(create_app(engine, tok, model_name="tiny", request_timeout=0.3)) as c:
        worker, server = c.app.state.worker, c.app.state.server
        worker.pause()  # nothing runs: every request waits past its deadline
        # a server that lost its timeout answers 200 once this resumes the engine, instead of
        # hanging the suite (a mutant of the deadline code would otherwise wait forever here)
        watchdog = threading.Timer(10.0, worker.resume)
        watchdog.start()
        try:
            r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 5, "n": 2})
            assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
            chunks, done = sse(c, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                           "max_tokens": 5, "stream": True})
            assert not done and chunks[-1]["error"]["code"] == "request_timeout"
            assert server.outstanding == 0
        finally:
            watchdog.cancel()
            worker.resume()
        deadline = time.time() + 10
        while worker.stats["active_requests"] and time.time() < deadline:
            time.sleep(0.01)
        assert worker.stats["active_requests"] == 0 and not engine.has_work  # cancelled, slots free
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_a_reward_checkpoint_alone_serves_scoring_only(tok, tmp_path):
    from nemojax.checkpoint import save_model
    from nemojax.config import RewardConfig
    from nemojax.inference.reward import RewardScorer
    from nemojax.inference.setup import SetupError, load_for_sampling
    from nemojax.model.reward import make_model

    cfg = ModelConfig(vocab_size=4096, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                      ffn_hidden_size=64, max_seq_len=64, reward=RewardConfig(enabled=True, attributes=["a", "b"],
                                                                              weights={"a": 1.0, "b": -2.0}))
    model = make_model(cfg, seed=1)
    save_model(model, cfg, tmp_path / "rm")
    with pytest.raises(SetupError, match="not a language model"):  # `nemojax serve` then serves scoring only
        load_for_sampling(tmp_path / "rm")
    scorer = RewardScorer(model, tok, batch_size=2, max_len=64)
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    [want] = scorer.score([conv])
    with TestClient(create_app(None, tok, model_name="rm", reward=scorer)) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["rm"]
        out = c.post("/v1/chat/completions", json={"messages": conv}).json()  # the only model: no name needed
        assert [(e["token"], e["logprob"]) for e in out["choices"][0]["logprobs"]["content"]] == \
            [("a", pytest.approx(want["a"])), ("b", pytest.approx(want["b"]))]
        r = c.post("/v1/reward", json={"messages": conv}).json()["data"][0]
        assert r["reward"] == pytest.approx(want["a"] - 2 * want["b"], abs=1e-5)
        r = c.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = c.post("/v1/reward", json={"conversations": [conv, [{"role": "user", "content": "x"}]]})
        assert r.status_code == 400 and "conversations[1]" in r.json()["error"]["message"]
