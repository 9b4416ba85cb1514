"""The real HTTP server (uvicorn) in a thread of the test process, for tests that must reach the
app the way users do (sockets, the `openai` client) and still look inside it: the engine's
slots, the tokenizer's calls, the queue.

Test modules import this (`from serve_live import ...`; pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn


class LiveServer:
    """`app` served by uvicorn on a free localhost port from a daemon thread until `stop()`."""

    def __init__(self, app: Any) -> None:
        self.app = app
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True,
                                       name="uvicorn-test")
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


class CountingTokenizer:
    """A tokenizer that counts what it is asked to encode (did the server tokenize at all?)."""

    def __init__(self, tok: Any) -> None:
        self._tok = tok
        self.encoded_calls = 0
        self.encoded_chars = 0
        self.delay = 0.0  # seconds each encode takes on top (a slow tokenizer, for a test)

    def encode(self, text: str, *args: Any, **kw: Any) -> list[int]:
        self.encoded_calls += 1
        self.encoded_chars += len(text)
        if self.delay:
            time.sleep(self.delay)
        return self._tok.encode(text, *args, **kw)

    def encode_batch(self, texts: Any, *args: Any, **kw: Any) -> list[list[int]]:
        texts = list(texts)
        self.encoded_calls += len(texts)
        self.encoded_chars += sum(map(len, texts))
        return self._tok.encode_batch(texts, *args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)


class GatedScorer:
    """A reward scorer whose `score` waits while its gate is closed: how a test holds scoring
    in flight to see the queue, the timeout and the drain act on reward requests. Its scores
    are plain functions of the text (the real scorer's numbers are tested elsewhere)."""

    attributes = ["helpfulness", "verbosity"]

    def __init__(self, batch_size: int = 2) -> None:
        self.batch_size = batch_size
        self.gate = threading.Event()
        self.gate.set()
        self.calls: list[int] = []  # conversations per call, in order
        self.waiting = threading.Event()  # set while a call waits at the closed gate

    def score(self, conversations: Any) -> list[dict[str, float]]:
        self.waiting.set()
        self.gate.wait()
        self.waiting.clear()
        self.calls.append(len(conversations))
        out = []
        for conv in conversations:
            text = conv[-1]["content"]
            out.append({"helpfulness": float(len(text)), "verbosity": float(text.count(" ")),
                        "reward": float(len(text)) - text.count(" ")})
        return out
