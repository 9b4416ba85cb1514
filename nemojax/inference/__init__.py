"""Sampling engine: continuous batching over a preallocated KV cache (engine.py), per-request
sampling (sampling.py), request / completion records (requests.py)."""

from nemojax.inference.engine import Engine
from nemojax.inference.requests import Completion, Request
from nemojax.inference.sampling import SamplingError, SamplingParams

__all__ = ["Completion", "Engine", "Request", "SamplingError", "SamplingParams"]
