"""The server under attack and at its limits, reached the way users reach it: real HTTP (uvicorn
in a thread of this process, so the tests can also look at the engine's slots, the tokenizer's
calls and the queue), raw sockets where the attack is at the byte level, the `openai` client
where a client would use it.

One engine serves the module: 4 slots + a queue of 4 (capacity 8), 128-token context, fully
warmed up before the first request (issue 18 point 4: no compile while serving). Its reward
model is a `GatedScorer`, whose scoring a test can hold in flight.

Each test names, in its docstring, the bug (mutant) it is there to catch.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import random
import socket
import statistics
import threading
import time

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from serve_live import CountingTokenizer, GatedScorer, LiveServer  # noqa: E402

import jax  # noqa: E402

from nemojax.config import ModelConfig  # noqa: E402
from nemojax.data.tokenizer import load_tokenizer  # noqa: E402
from nemojax.inference import Engine  # noqa: E402
from nemojax.model.transformer import init_model  # noqa: E402
from nemojax.serve.app import DEFAULT_MAX_BODY_BYTES, OPEN_PATHS, create_app  # noqa: E402
from nemojax.serve.protocol import MAX_SAMPLES, MAX_STOP_CHARS  # noqa: E402

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SLOTS, QUEUE, MAX_LEN = 4, 4, 128
ENGINE_KW = dict(max_slots=SLOTS, max_len=MAX_LEN, decode_steps=4, max_prefill_batch=4, min_bucket=32,
                 prefill_chunk=32, max_prefill_tokens=128, block_size=16)
WARM_UP: dict[str, float] = {}  # what the full warm-up cost (printed by the compile test)


@pytest.fixture(scope="module")
def tok():
    return CountingTokenizer(load_tokenizer("builtin"))


@pytest.fixture(scope="module")
def engine(tok):
    cfg = ModelConfig(vocab_size=4096, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      ffn_hidden_size=128, init_std=0.2, max_seq_len=MAX_LEN)
    # No stop token: a sample runs to max_tokens (or a stop string), so lengths are known.
    eng = Engine(init_model(cfg, seed=0), tokenizer=tok, stop_token_ids=[], **ENGINE_KW)
    start = time.perf_counter()
    stats = eng.warm_up(full=True)
    WARM_UP.update(seconds=time.perf_counter() - start, programs=sum(eng.compile_counts().values()),
                   compiled=stats["compiled"], loaded=stats["loaded"])
    return eng


@pytest.fixture(scope="module")
def live(engine, tok):
    scorer = GatedScorer(batch_size=2)
    app = create_app(engine, tok, model_name="tiny", api_key=KEY, max_queue=QUEUE, reward=scorer,
                     reward_model_name="tiny-reward")
    server = LiveServer(app)
    server.state, server.worker, server.scorer = app.state.server, app.state.worker, scorer
    try:
        yield server
    finally:
        scorer.gate.set()
        server.stop()


@pytest.fixture(scope="module")
def client(live):
    with httpx.Client(base_url=live.url, headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def oai(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def metrics(client) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(name, sorted labels): value}, read by prometheus_client's
    own parser (not ours)."""
    text = client.get("/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))


def wait_for(condition, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def idle(live) -> None:
    wait_for(lambda: live.state.outstanding == 0 and not live.worker.engine.has_work, what="the server to be idle")


# --------------------------------------------------------------------------- issue 18 point 10: the port


def test_serve_refuses_a_busy_port_before_loading_the_model(tmp_path, monkeypatch, capsys):
    """Mutant killed: the port found busy only when uvicorn binds it, after the model has loaded
    (minutes for a big model, then a traceback). Exit 2, one line naming the port."""
    import nemojax.inference.setup as setup
    from nemojax.cli import main

    monkeypatch.setattr(setup, "load_for_sampling", lambda *a, **k: pytest.fail("loaded before the port check"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc = main(["serve", "--checkpoint", str(tmp_path), "--port", str(port)])
    err = capsys.readouterr().err
    assert rc == 2 and f"port {port} on 127.0.0.1 is already in use" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- issue 22: auth on every route


def test_every_route_but_the_probes_needs_the_key(live):
    """Mutant killed: the API-key check dropped on /v1/chat/completions, /detokenize or /v1/reward
    (or on any route added later: the routes are enumerated from the app, not listed here).

    Without the key, or with a wrong one, every route but /health, /metrics and /version
    answers 401 (before reading the body); with the key, none does."""
    routes = [(r.path, sorted(r.methods - {"HEAD"})[0]) for r in live.app.routes if getattr(r, "methods", None)]
    paths = {p for p, _ in routes}
    assert {"/v1/chat/completions", "/detokenize", "/v1/reward", "/v1/completions", "/tokenize",
            "/v1/models"} <= paths and set(OPEN_PATHS) <= paths
    guarded = [(p, m) for p, m in routes if p not in OPEN_PATHS]
    with httpx.Client(base_url=live.url, timeout=30) as c:
        for path, method in guarded:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
                r = c.request(method, path, headers=headers, json={})
                assert r.status_code == 401, (method, path, headers, r.status_code, r.text)
                assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
            r = c.request(method, path, headers=AUTH, json={})
            assert r.status_code != 401, (method, path, r.text)
        for path in OPEN_PATHS:
            assert c.get(path).status_code == 200, path


# --------------------------------------------------------------------------- issue 18 point 1: limits before work


class Prober:
    """GETs /health over one kept-alive connection, again and again, recording each latency."""

    def __init__(self, port: int) -> None:
        self.port, self.latencies, self.stop = port, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self.stop.is_set():
            start = time.perf_counter()
            conn.request("GET", "/health")
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
            self.latencies.append((start, time.perf_counter() - start))
            time.sleep(0.005)
        conn.close()

    def during(self, start: float, end: float) -> list[float]:
        return [lat for t, lat in self.latencies if start <= t <= end or start <= t + lat <= end]


def upload(port: int, size: int, chunked: bool) -> tuple[int, float]:
    """POST a `size`-byte body, {"prompt": "aaa..."}, as fast as the socket takes it (declared
    with Content-Length, or sent chunked without one); (status, seconds from the first byte
    sent to the status line)."""
    sock = socket.create_connection(("127.0.0.1", port))
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\n")
    head += "Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {size}\r\n\r\n"
    filler = b"a" * 2**20

    def pieces():  # {"prompt": "aaa..."}: exactly `size` bytes
        left = size - len(b'{"prompt": ""}')
        yield b'{"prompt": "'
        while left > 0:
            yield filler[:left]
            left -= len(filler)
        yield b'"}'

    def send() -> None:
        try:
            sock.sendall(head.encode())
            for data in pieces():
                sock.sendall(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except OSError:  # the server refused and closed: expected
            pass

    start = time.perf_counter()
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    status_line = sock.makefile("rb").readline()
    seconds = time.perf_counter() - start
    sock.close()
    sender.join(30)
    return int(status_line.split()[1]), seconds


def test_a_50mb_body_is_refused_at_once_and_health_stays_fast(live, client, tok):
    """Mutants killed: no body limit (the 50 MB prompt is read, parsed and tokenized: tens of
    seconds, as issue 18 measured); a limit only checked on Content-Length (a chunked upload
    passes) or only after the whole body is read; tokenizing on the event loop (/health waits
    for it).

    Measured (printed): seconds to the 413 for a 50 MB body with and without Content-Length, and
    /health latencies while the uploads run and while a request's tokenizer is busy (0.4 s)."""
    prober = Prober(live.port)
    prober.thread.start()
    try:
        time.sleep(0.1)
        t0 = time.perf_counter()
        status_cl, seconds_cl = upload(live.port, 50 * 2**20, chunked=False)
        status_ch, seconds_ch = upload(live.port, 50 * 2**20, chunked=True)
        t1 = time.perf_counter()
        tok.delay = 0.4  # a tokenizer this slow must not hold up /health
        try:
            r = client.post("/v1/completions", json={"prompt": "slow to tokenize", "max_tokens": 2})
        finally:
            tok.delay = 0.0
        t2 = time.perf_counter()
        time.sleep(0.05)
    finally:
        prober.stop.set()
        prober.thread.join(30)
    assert status_cl == 413 and status_ch == 413
    assert seconds_cl < 1.0 and seconds_ch < 1.0, (seconds_cl, seconds_ch)
    assert r.status_code == 200, r.text
    uploads, tokenizing = prober.during(t0, t1), prober.during(t1, t2)
    assert len(tokenizing) >= 3, "too few /health probes while the tokenizer was busy"
    report = {"refused_with_content_length_s": round(seconds_cl, 4), "refused_chunked_s": round(seconds_ch, 4),
              "health_during_uploads_max_s": round(max(uploads), 4), "health_probes_during_uploads": len(uploads),
              "health_while_tokenizing_max_s": round(max(tokenizing), 4),
              "health_p50_s": round(statistics.median(lat for _, lat in prober.latencies), 4)}
    print(json.dumps(report))
    # Issue 18's bound is 0.1 s (measured: a few ms); the max gets headroom for a loaded 2-core CI
    # host, where one probe can wait for a CPU. The unfixed server takes seconds.
    during = sorted(uploads + tokenizing)
    assert during[int(0.9 * (len(during) - 1))] < 0.1 and during[-1] < 0.25, report
    status, _ = upload(live.port, DEFAULT_MAX_BODY_BYTES + 1, chunked=False)  # the default limit, exactly
    assert status == 413
    r = client.post("/v1/completions", json={"prompt": "x" * 1000, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"  # under the limit: parsed


def test_work_is_bounded_before_it_is_done(live, client, tok):
    """Mutants killed: the prompt count checked after tokenizing (10^5 prompts tokenized first),
    text length checked after tokenizing, a RecursionError on deep JSON (500), unbounded stop
    strings. Each request is a 4xx in OpenAI's shape, and the tokenizer was never called."""
    def refused(body, param=None, status=400, raw=None):
        calls = tok.encoded_calls
        r = client.post("/v1/completions" if "messages" not in (body or {}) else "/v1/chat/completions",
                        content=raw if raw is not None else json.dumps(body).encode(),
                        headers={"Content-Type": "application/json"})
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["message"] and err["param"] == param and "Traceback" not in r.text, err
        assert tok.encoded_calls == calls, f"tokenized before refusing: {err}"
        return err

    start = time.perf_counter()
    refused({"prompt": ["x"] * 10**5}, "prompt")
    refused({"prompt": [[5, 6]] * (MAX_SAMPLES + 1)}, "prompt")
    refused({"prompt": ["x"] * (MAX_SAMPLES // 4 + 1), "n": 4}, "prompt")
    assert time.perf_counter() - start < 5
    long_text = "word " * (live.state.parser.max_chars // 5 + 1)
    assert refused({"prompt": long_text}, "prompt")["code"] == "context_length_exceeded"
    refused({"messages": [{"role": "user", "content": long_text}]}, "messages")
    refused({"prompt": list(range(5, 5 + 10**5))}, "prompt")  # token ids: refused by count, not walked
    r = client.post("/tokenize", json={"prompt": long_text})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    for raw in (b"[" * 100_000, b'{"prompt": ' + b"[" * 5_000 + b"]" * 5_000 + b"}",
                b'{"prompt": "x", "stop": ' + b"[" * 40 + b"]" * 40 + b"}",
                b'{"prompt": [' + b"[1]," * 70_000 + b"[1]]}",
                b'{"prompt": "x", "max_tokens": ', b"\xff\xfe{}", b'{"prompt": "x"} trailing'):
        refused(None, raw=raw)
    assert "nests deeper" in refused(None, raw=b'{"a": ' + b"[" * 33 + b"]" * 33 + b"}")["message"]
    refused({"prompt": "x", "stop": "s" * (MAX_STOP_CHARS + 1)}, "stop")
    refused({"prompt": "x", "stop": "s" * 10**6}, "stop")
    refused({"prompt": "x", "stop": [str(i) for i in range(17)]}, "stop")
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "stop": "s" * MAX_STOP_CHARS})
    assert r.status_code == 200, r.text  # the bound itself is accepted


def test_reward_requests_share_the_queue_and_the_timeout(live, client, monkeypatch):
    """Mutants killed: reward scoring outside the queue (a full server still scores, and a
    generation request still gets in), without the request timeout; timed-out scoring still
    run later (its queued batches must never start); a full server parsing a body before
    refusing it."""
    scorer, state = live.scorer, live.state
    conv = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "four"}]
    pool = concurrent.futures.ThreadPoolExecutor(2)
    scorer.gate.clear()
    try:
        held = pool.submit(client.post, "/v1/reward", json={"conversations": [conv] * (SLOTS + QUEUE)})
        wait_for(lambda: state.outstanding == SLOTS + QUEUE and scorer.waiting.is_set(), what="reward in flight")
        for path, body in (("/v1/reward", {"messages": conv}),
                           ("/v1/completions", {"prompt": "x", "max_tokens": 2}),
                           ("/v1/chat/completions", {"model": "tiny-reward", "messages": conv})):
            r = client.post(path, json=body)
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, (path, r.text)
            r = client.post(path, content=b"{not even json", headers={"Content-Type": "application/json"})
            assert r.status_code == 429, (path, r.text)  # refused before the body is parsed
        scorer.gate.set()
        r = held.result(30)
        assert r.status_code == 200 and [d["index"] for d in r.json()["data"]] == list(range(SLOTS + QUEUE))
        assert r.json()["data"][0]["attributes"]["helpfulness"] == len("four")
        wait_for(lambda: state.outstanding == 0, what="places given back")
        # Timeout: the first request's first batch is running at the closed gate; its second batch
        # and the whole second request are queued, and never run once they time out.
        monkeypatch.setattr(state, "request_timeout", 0.5)
        scorer.gate.clear()
        scorer.calls.clear()
        first = pool.submit(client.post, "/v1/reward", json={"conversations": [conv] * 4})
        wait_for(scorer.waiting.is_set, what="the first batch at the gate")
        second = pool.submit(client.post, "/v1/reward", json={"conversations": [conv] * 2})
        for r in (first.result(30), second.result(30)):
            assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout", r.text
        scorer.gate.set()
        wait_for(lambda: state.outstanding == 0, what="timed-out places given back")
        time.sleep(0.2)
        assert scorer.calls == [2]  # only the batch already running when the timeout hit
    finally:
        scorer.gate.set()
        pool.shutdown()


def test_draining_refuses_new_work_also_mid_parse(live, client, tok, monkeypatch):
    """Mutants killed: reward requests accepted while draining; the drain checked only before a
    body is parsed (a request whose tokenizing was under way when SIGTERM came then runs) or
    only after (a draining server still parses every body)."""
    conv = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "four"}]
    state = live.state
    monkeypatch.setattr(state, "draining", True)
    for path, raw in (("/v1/reward", json.dumps({"messages": conv}).encode()), ("/v1/reward", b"{not json"),
                      ("/v1/completions", b"{not json"), ("/v1/chat/completions", b"{not json")):
        r = client.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error", (path, raw, r.text)
    monkeypatch.setattr(state, "draining", False)
    calls = tok.encoded_calls
    monkeypatch.setattr(tok, "delay", 0.3)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        late = pool.submit(client.post, "/v1/completions", json={"prompt": "drain me", "max_tokens": 2})
        wait_for(lambda: tok.encoded_calls > calls, what="the prompt being tokenized")
        state.draining = True  # SIGTERM while the request is being parsed
        r = late.result(30)
    assert r.status_code == 503, r.text
    assert live.worker.stats["active_requests"] == 0 and state.outstanding == 0


# --------------------------------------------------------------------------- issue 18 point 2: bounded metrics


def test_unknown_paths_add_no_metric_series(live, client):
    """Mutant killed: the raw path as the endpoint label (3000 paths, 3000+ new series: issue 18
    measured 57,000 series and 4.3 MB). Route templates label known routes; the rest is one
    'unmatched' label."""
    with httpx.Client(base_url=live.url, timeout=30) as anonymous:
        for c in (anonymous, client):  # create the "unmatched" series (401 and 404) first
            c.get("/v1/x-warm")
        metrics(client)
        before = metrics(client)
        start = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=30)  # kept alive, light
        for i in range(3000):
            conn.request("GET", f"/v1/x{i:05d}")
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 401
        conn.close()
        assert client.get("/v1/y00001").status_code == 404
        seconds = time.perf_counter() - start
    after = metrics(client)
    print(json.dumps({"series_before": len(before), "series_after": len(after), "requests_s": round(seconds, 2)}))
    assert set(after) == set(before), set(after) ^ set(before)
    assert not [k for k in after if any("x0" in v for _, v in k[1])]
    assert total(after, "nemojax_requests_total", endpoint="unmatched", status="401") - \
        total(before, "nemojax_requests_total", endpoint="unmatched", status="401") == 3000


def test_vllm_style_metrics_add_up(live, client, engine, tok):
    """Mutants killed: prefix-cache hits exported as a gauge or not counted for forks; queries not
    counted; finished reasons, queue / prefill / decode times or inter-token latencies not
    observed per sample; no model_name label. Checked against numbers computed here from the
    block size, the responses and the wall clock."""
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    prompt = [int(t) for t in rng.integers(5, 4000, size=int(rng.integers(40, 70)))]  # fresh: not cached
    before = metrics(client)
    outs = [client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 6, "temperature": 0, "n": 2}).json()
            for _ in range(2)]
    worker = live.worker
    worker.pause()  # queued for 0.3 s at least
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        queued = pool.submit(client.post, "/v1/completions", json={"prompt": "queued", "max_tokens": 3})
        wait_for(lambda: engine.queued() == 1, what="the request in the engine's queue")
        time.sleep(0.3)
        worker.resume()
        assert queued.result(30).status_code == 200
    after = metrics(client)

    def grew(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    L, bs = len(prompt), engine.block_size
    # queries: every admitted sample's prompt; hits: forks reuse the whole prompt but its last
    # token, the second request's first sample its whole leading blocks from the prefix cache.
    assert grew("nemojax_prefix_cache_queries_total") == 4 * L + len(tok.encode("queued", bos=True))
    assert grew("nemojax_prefix_cache_hits_total") == 2 * (L - 1) + (L - 1) // bs * bs
    assert outs[1]["usage"]["prompt_tokens_details"]["cached_tokens"] == (L - 1) // bs * bs
    assert grew("nemojax_request_success_total", finished_reason="length", model_name="tiny") == 5
    for name in ("nemojax_request_queue_time_seconds_count", "nemojax_request_prefill_time_seconds_count",
                 "nemojax_request_decode_time_seconds_count"):
        assert grew(name, model_name="tiny") == 5, name
    assert grew("nemojax_request_queue_time_seconds_sum") >= 0.3
    tokens = 4 * 6 + 3
    assert grew("nemojax_completion_tokens_total", model_name="tiny") == tokens
    assert grew("nemojax_inter_token_latency_seconds_count", model_name="tiny") == tokens - 5
    assert 0 < grew("nemojax_inter_token_latency_seconds_sum") < 30
    types = {f.name: f.type for f in text_string_to_metric_families(client.get("/metrics").text)}
    assert types["nemojax_prefix_cache_hits"] == types["nemojax_prefix_cache_queries"] == "counter"
    assert types["nemojax_kv_cache_usage_perc"] == "gauge" and types["nemojax_inter_token_latency_seconds"] == "histogram"


# --------------------------------------------------------------------------- issue 18 point 3: 429 before 200


def test_a_streaming_burst_past_capacity_gets_429_not_errors_in_200_streams(live, oai):
    """Mutant killed: a stream's places reserved only once its body starts (after the 200): six
    simultaneous `stream: true, n: 4` requests at capacity 8 then all get 200 and four carry an
    'at capacity' error inside the stream, with no Retry-After (issue 18)."""
    worker = live.worker
    worker.pause()  # the admitted streams hold their places while the burst arrives
    barrier = threading.Barrier(6)

    def burst(i: int):
        barrier.wait()
        try:
            return oai.completions.create(model="tiny", prompt=f"Burst {i}", max_tokens=5, n=4, stream=True,
                                          temperature=0)
        except openai.APIStatusError as e:
            return e

    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            results = list(pool.map(burst, range(6)))
    finally:
        worker.resume()
    refused = [r for r in results if isinstance(r, openai.APIStatusError)]
    streams = [r for r in results if not isinstance(r, openai.APIStatusError)]
    assert len(streams) == 2 and len(refused) == 4, results
    for e in refused:
        assert e.status_code == 429 and int(e.response.headers["retry-after"]) >= 1
        assert e.response.json()["error"]["code"] == "queue_full"
    for stream in streams:
        finished = [c.choices[0].finish_reason for c in stream if c.choices and c.choices[0].finish_reason]
        assert finished == ["length"] * 4
    idle(live)


# --------------------------------------------------------------------------- issue 22: cancellation


def pause_at_first_tokens(worker, monkeypatch) -> threading.Event:
    """Make the worker pause itself right after it emits the first tokens of any request: the
    request then holds its slots, half generated, for as long as the test needs (deterministic:
    the pause is queued on the worker thread before its next step)."""
    paused = threading.Event()
    emit = worker._emit

    def emit_then_pause(sub, event):
        emit(sub, event)
        if type(event).__name__ == "Progress" and not paused.is_set():
            worker.pause()
            paused.set()

    monkeypatch.setattr(worker, "_emit", emit_then_pause)
    return paused


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_a_disconnected_client_is_cancelled_in_the_worker(live, client, engine, monkeypatch, stream):
    """Mutant killed: a disconnected request not cancelled in the worker (its samples keep their
    slots and generate to max_tokens for nobody). The engine is held right after the request's
    first tokens, so the test sees the slots freed by the cancel alone, not by the request
    finishing. Also: KV-cache usage while it runs, and the abort counted."""
    idle(live)
    worker = live.worker
    paused = pause_at_first_tokens(worker, monkeypatch)
    before = metrics(client)
    body = json.dumps({"prompt": "The quick brown fox", "max_tokens": 100, "n": 2, "temperature": 0,
                       "stream": stream}).encode()
    sock = socket.create_connection(("127.0.0.1", live.port))
    try:
        sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
        assert paused.wait(30)
        assert engine.running() == 2 and engine.has_work  # held mid-generation
        usage = metrics(client)
        assert total(usage, "nemojax_kv_cache_usage_perc", model_name="tiny") == 2 / SLOTS
        filled = total(usage, "nemojax_kv_cache_filled_perc")
        prompt = len(live.state.tokenizer.encode("The quick brown fox", bos=True))
        assert 2 * prompt / (SLOTS * MAX_LEN) <= filled <= 2 * (prompt + 100) / (SLOTS * MAX_LEN), filled
    finally:
        sock.close()
    try:
        wait_for(lambda: engine.running() == 0 and not engine.has_work, timeout=15,
                 what="the worker to cancel the disconnected request")
        assert worker._paused  # still held: only the cancel freed the slots
    finally:
        worker.resume()
    idle(live)
    after = metrics(client)
    assert total(after, "nemojax_request_success_total", finished_reason="abort") - \
        total(before, "nemojax_request_success_total", finished_reason="abort") == 2


# --------------------------------------------------------------------------- issue 18 point 4: no compile in traffic


def test_no_compile_while_serving_a_mixed_load_after_full_warm_up(live, client, engine, oai):
    """Mutants killed: a full warm-up that misses a shape the scheduler makes (batched chunks at a
    deeper window, top log-probs, prompt log-probs, ...): the first request needing it compiles
    while serving (issue 18: 3 programs, 7.4 s, for two 100-token prompts arriving together).

    The load is drawn at random per run (seed printed): prompt lengths, concurrency, n, greedy or
    sampled, logprobs / top_logprobs, echo + prompt log-probs, streams, stop strings. Compiles
    are counted by JAX's own monitoring events on every thread (tracing or backend compiling
    anything) and by the engine's program counters."""
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    events: list[str] = []

    def on_duration(name: str, *_a, **_k) -> None:
        if name.startswith("/jax/core/compile/"):
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    shapes: list[tuple] = []
    key_of = engine._prefill_key

    def record(*args):
        shapes.append(args)
        return key_of(*args)

    def draw() -> dict:
        """One request of the load: what it asks for, drawn from this run's seed."""
        kind = rng.choice(["completion", "completion", "chat", "score"])
        length = rng.randint(1, 110)
        spec = {"kind": kind, "ids": [rng.randint(5, 4000) for _ in range(length)]}
        if kind == "score":  # prompt log-probs (echo), what judges and rankers call
            spec["logprobs"] = rng.choice([0, 1, 5])
            return spec
        if kind == "chat":  # a few words: the prompt stays far from the context
            spec["words"] = " ".join(f"w{t}" for t in spec["ids"][:rng.randint(1, 12)])
            spec["top"] = rng.choice([None, 0, 3])
        else:
            spec["logprobs"] = rng.choice([None, 0, 2])
        room = MAX_LEN - (64 if kind == "chat" else length + 1)
        spec["kw"] = dict(max_tokens=min(room, rng.randint(1, 40)), n=rng.choice([1, 1, 2]),
                          temperature=rng.choice([0.0, 0.9]), stream=rng.random() < 0.4,
                          stop=rng.choice([None, None, "e", ["zz", "q"]]))
        return spec

    def send(spec: dict) -> None:
        if spec["kind"] == "score":
            out = oai.completions.create(model="tiny", prompt=spec["ids"], max_tokens=0, echo=True,
                                         logprobs=spec["logprobs"])
            assert out.choices[0].logprobs.token_logprobs[0] is None
            return
        if spec["kind"] == "chat":
            out = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": spec["words"]}],
                                              logprobs=spec["top"] is not None, top_logprobs=spec["top"],
                                              **spec["kw"])
        else:
            out = oai.completions.create(model="tiny", prompt=spec["ids"], logprobs=spec["logprobs"], **spec["kw"])
        if spec["kw"]["stream"]:
            list(out)

    load, concurrency = [draw() for _ in range(24)], rng.randint(2, 4)  # <= 4 x n 2 = 8 samples: no 429
    stats0 = dict(engine.compile_stats())
    engine._prefill_key = record
    try:
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(send, load))
    finally:
        del engine._prefill_key
        jax.monitoring.unregister_event_duration_listener(on_duration)
    stats1 = engine.compile_stats()
    new = (stats1["compiled"] - stats0["compiled"], stats1["loaded"] - stats0["loaded"])
    report = {"seed": seed, "concurrency": concurrency, "warm_up_s": round(WARM_UP["seconds"], 2), "warm_up_programs": WARM_UP["programs"],
              "warm_up_compiled": WARM_UP["compiled"], "warm_up_loaded": WARM_UP["loaded"],
              "prefill_shapes_requested": len(set(shapes)), "padded": len({s for s in set(shapes) if not
                                                                          engine.programs.has("prefill", s)}),
              "compile_events_while_serving": len(events), "programs_obtained_while_serving": new}
    print(json.dumps(report))
    assert not events and new == (0, 0), report
    assert len(set(shapes)) >= 3, report  # the load did reach several shapes


def test_a_wider_prefill_window_equals_the_exact_program(live, engine):
    """Mutant killed: a prefill run on a program that does not cover it (a narrower window, other
    rows or chunk) or fed wrongly: after a full warm-up, a batch whose window was not compiled
    runs at a wider one, and its greedy tokens and log-probs must equal those of the exact
    program compiled for the same call.

    Last in the module: it compiles that exact program (the reference)."""
    from nemojax.inference import Request, SamplingParams

    idle(live)
    live.worker.pause()  # the engine is driven here directly meanwhile
    try:
        rng = np.random.default_rng(1)
        base = [int(t) for t in rng.integers(5, 4000, 32)]
        # Two prompts sharing a cached 32-token prefix + a few new tokens, prefilled together:
        # 2 rows, chunk 32, window 64 (rows 32-42 of the slot): not a warm-up shape.
        requests = [Request(f"p{i}", base + [int(t) for t in rng.integers(5, 4000, 10 + i)],
                            SamplingParams(temperature=0, max_tokens=6, logprobs=True)) for i in range(2)]
        engine.generate_all([Request("cache", base + [7], SamplingParams(max_tokens=1))])
        seen = []
        key_of = engine._prefill_key
        engine._prefill_key = lambda *a: seen.append((a, key_of(*a))) or key_of(*a)
        try:
            wide = engine.generate_all(requests)
        finally:
            del engine._prefill_key
        assert ((2, 32, 64, False), (2, 32, 128, False)) in seen, seen
        engine.pad_to_compiled = False  # the exact shape compiles now: the reference
        try:
            exact = engine.generate_all(requests)
        finally:
            engine.pad_to_compiled = True
        assert engine.programs.has("prefill", (2, 32, 64, False))
        for a, b in zip(wide, exact):
            assert a.output_ids == b.output_ids and a.cached_tokens == b.cached_tokens == 32
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    finally:
        live.worker.resume()
