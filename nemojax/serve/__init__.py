"""OpenAI-compatible HTTP serving over the in-process sampling engine.

`create_app(engine, tokenizer, ...)` builds the FastAPI app (app.py; request parsing in
protocol.py, response bodies and streams in responses.py, Prometheus metrics in metrics.py,
reward scoring in reward.py); `EngineWorker` (worker.py) is the background thread that owns the
engine and batches concurrent requests. `nemojax serve` (commands/serve.py) loads a checkpoint
and runs the app with uvicorn. FastAPI is imported only by `create_app`'s module, so the worker
is usable without the `serve` extra.
"""

from nemojax.serve.worker import EngineWorker, Failure, Progress, WorkerStopped

__all__ = ["EngineWorker", "Failure", "Progress", "WorkerStopped", "create_app"]


def __getattr__(name: str):  # lazy: importing nemojax.serve must not require fastapi
    if name == "create_app":
        from nemojax.serve.app import create_app

        return create_app
    raise AttributeError(name)
