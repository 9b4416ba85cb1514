"""Sampling engine: continuous batching with chunked prefill and prefix sharing over a
preallocated KV cache (engine.py), its device programs (programs.py, forward.py), per-request
sampling (sampling.py), request / completion records (requests.py)."""

from nemojax.inference.engine import Engine
from nemojax.inference.requests import Completion, Request, TokenDelta
from nemojax.inference.sampling import SamplingError, SamplingParams

__all__ = ["Completion", "Engine", "Request", "SamplingError", "SamplingParams", "TokenDelta"]
