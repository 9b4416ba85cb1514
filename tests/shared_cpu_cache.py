"""Test-only: every process of a multi-process CPU test job reads the persistent compilation cache.

JAX 0.10.2 puts a fingerprint of the device topology into each persistent-cache key, and in a
multi-process CPU job that fingerprint differs from process to process (it depends on which
devices are local). Only process 0 writes the cache, so process 1 never finds an entry and
compiles every program of every launch: about 10 of its 14 CPU-seconds for a 4-step tiny run.
`install()` replaces the fingerprint of an all-CPU device set by its size, so process 1 loads
the executable process 0 compiled for the same global program -- what JAX itself does with
`jax_share_binary_between_hosts`, sending it over the network instead. Nothing else changes;
if JAX moves the function, this does nothing and the tests are only slower.
"""

from __future__ import annotations


def install() -> None:
    from jax._src import cache_key

    original = getattr(cache_key, "_hash_accelerator_config", None)
    hash_string = getattr(cache_key, "_hash_string", None)
    if original is None or hash_string is None:
        return

    def same_on_every_process(hash_obj, accelerators, *args, **kwargs):  # type: ignore[no-untyped-def]
        if all(d.platform == "cpu" for d in accelerators.flat):
            hash_string(hash_obj, f"cpu devices: {accelerators.size}")
            return None
        return original(hash_obj, accelerators, *args, **kwargs)

    cache_key._hash_accelerator_config = same_on_every_process
