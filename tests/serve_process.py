"""A real `nemojax serve` process for tests that must reach the server the way users do.

Test modules import this (`from serve_process import ...`; pytest puts tests/ on sys.path).
The server runs in a subprocess on a free localhost port with the test session's compilation
cache (so its compiled programs persist across runs), its output in a log file; `stop()`
sends SIGTERM and waits, killing it if it does not exit.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# One engine shape for every real-server test module (and the offline engines they compare
# with), so they share compiled programs.
ENGINE_ARGS = ["--batch-slots", "4", "--max-len", "256", "--decode-steps", "4", "--max-prefill-batch", "4",
               "--prefill-chunk", "32", "--max-prefill-tokens", "128"]
ENGINE_KW = dict(max_slots=4, max_len=256, decode_steps=4, max_prefill_batch=4, prefill_chunk=32,
                 max_prefill_tokens=128)


def tiny_checkpoint(out_dir: Path) -> Path:
    """A tiny random HF Nemotron with the builtin tokenizer's 4096-token vocabulary."""
    from hf_tiny import save_tiny_hf

    _, path = save_tiny_hf(out_dir, seed=7, vocab_size=4096, max_position_embeddings=1024)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, checkpoint: Path, log_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        import jax

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        environ = dict(os.environ)
        cache = jax.config.jax_compilation_cache_dir
        if cache:
            environ["JAX_COMPILATION_CACHE_DIR"] = str(cache)
        environ.update(env or {})
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "nemojax.cli", "serve", "--checkpoint", str(checkpoint),
                                      "--port", str(self.port), "--model-name", "tiny", *args],
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, env=environ)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 300.0) -> "ServerProcess":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.25)
        self.kill()
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()[-4000:]}")

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
        return self.request("GET", path, None, headers)

    def post(self, path: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
        return self.request("POST", path, body, headers)

    def request(self, method: str, path: str, body: Any, headers: dict[str, str] | None = None,
                ) -> tuple[int, Any, dict[str, str]]:
        """(status, parsed JSON or text, headers); `body` may be raw bytes."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                status, raw, hdrs = r.status, r.read(), dict(r.headers)
        except urllib.error.HTTPError as e:
            status, raw, hdrs = e.code, e.read(), dict(e.headers)
        text = raw.decode("utf-8", errors="replace")
        try:
            return status, json.loads(text), hdrs
        except json.JSONDecodeError:
            return status, text, hdrs

    def metric(self, name: str) -> float:
        """A Prometheus sample from /metrics, summed over its label sets (e.g. model_name)."""
        _, text, _ = self.get("/metrics")
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith((name + " ", name + "{"))]
        if not values:
            raise KeyError(name)
        return sum(values)

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
