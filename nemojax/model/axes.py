"""Logical-axis annotation: the model's only contact with sharding. A leaf module (imports jax only).

The model names every dimension of its parameters and activations logically ("embed", "heads",
"batch", "length", ...) and never names a mesh axis. Which mesh axes a logical name maps to is a
*rules* table, `{logical name: (mesh axis, ...)}`, built from the config by
`nemojax.parallel.rules`. This module holds what both sides need and nothing else:

* `logical_to_spec(axes, rules, mesh)`: the PartitionSpec for an array whose dims are `axes`
  under a rules table (a mesh axis is used at most once per spec; size-1 mesh axes are dropped);
* `use_rules(mesh, rules)` / `constrain(x, axes)`: while a train step is traced under
  `use_rules`, `constrain` is a `with_sharding_constraint` by logical names; otherwise (one
  device, inference, plain `jit`, inside a shard_map) it is the identity.

Layering: `nemojax.model` imports this module; `nemojax.parallel` builds on it; nothing here
imports the rest of nemojax.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator, Mapping, Sequence

import jax
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

Rules = Mapping[str, Sequence[str]]  # logical axis -> mesh axes (empty = replicated)


def mesh_shape(mesh: Mesh | AbstractMesh) -> dict[str, int]:
    """{axis name: size} for a concrete or abstract mesh."""
    return dict(zip(mesh.axis_names, mesh.axis_sizes)) if isinstance(mesh, AbstractMesh) \
        else dict(mesh.shape)


def spec_axes(entry: Any) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry as a tuple."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def shards_per_dim(spec: PartitionSpec, ndim: int, sizes: Mapping[str, int]) -> list[int]:
    """How many pieces each of `ndim` dims is cut into by `spec`."""
    out = []
    for i in range(ndim):
        n = 1
        for a in spec_axes(spec[i] if i < len(spec) else None):
            n *= sizes[a]
        out.append(n)
    return out


def logical_to_spec(axes: Sequence[str | None], rules: Rules,
                    mesh: Mesh | AbstractMesh | None = None) -> PartitionSpec:
    """PartitionSpec for an array whose dims are named `axes`.

    Mesh axes of size 1 are dropped when a mesh is given (they shard nothing), and a mesh
    axis already taken by an earlier dim is skipped, so no spec ever uses an axis twice (that
    is what lets activations reuse parameter names: `[batch, length, activation_embed]` never
    fights `batch` for `fsdp`). A logical name missing from the rules is replicated.
    """
    sizes = mesh_shape(mesh) if mesh is not None else None
    used: set[str] = set()
    out: list[Any] = []
    for name in axes:
        picked = []
        for m in (rules.get(name, ()) if name is not None else ()):
            if m in used or (sizes is not None and sizes.get(m, 1) == 1):
                continue
            picked.append(m)
            used.add(m)
        out.append(None if not picked else picked[0] if len(picked) == 1 else tuple(picked))
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


_ACTIVE = threading.local()


@contextlib.contextmanager
def use_rules(mesh: Mesh | None, rules: Rules | None) -> Iterator[None]:
    """Make `constrain` active while tracing code under this context (thread-local)."""
    prev = getattr(_ACTIVE, "value", None)
    _ACTIVE.value = None if mesh is None or rules is None else (mesh, rules)
    try:
        yield
    finally:
        _ACTIVE.value = prev


def active_rules() -> tuple[Mesh, Rules] | None:
    """The (mesh, rules) installed by the innermost `use_rules`, or None."""
    return getattr(_ACTIVE, "value", None)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical axes, or the identity when no rules are active."""
    active = active_rules()
    if active is None:
        return x
    mesh, rules = active
    if len(axes) != x.ndim:
        raise ValueError(f"constrain: array of rank {x.ndim} given logical axes {tuple(axes)}")
    spec = logical_to_spec(axes, rules, mesh)
    cuts = shards_per_dim(spec, x.ndim, mesh_shape(mesh))
    # A dim its axes do not divide (a batch of 1 in a generation call, an odd length) is left
    # replicated rather than failing: activation constraints are a performance hint.
    entries = [spec[i] if i < len(spec) and x.shape[i] % cuts[i] == 0 else None for i in range(x.ndim)]
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*entries)))
