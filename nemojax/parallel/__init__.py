"""Parallelism: the device mesh, logical-axis sharding rules, pipelining and multi-host plumbing.

`mesh.py` builds the 4-axis mesh from the `mesh:` config; `rules.py` maps the model's logical
axis names to mesh axes (from `sharding:`); `state_sharding.py` derives parameter and
optimizer-state (ZeRO-1) PartitionSpecs; `batching.py` says which batch rows each process
loads and assembles global batches; `pipeline.py` is the interleaved pipeline schedule;
`distributed.py` joins a multi-host job; `memory.py` counts per-device bytes from specs;
`aot.py` compiles for TPU topologies from a CPU host. Nothing here imports `nemojax.train`:
the train step is built on top of this package in `nemojax.train.build`.
"""

from nemojax.parallel.mesh import MESH_AXES, axis_sizes, make_abstract_mesh, make_mesh
from nemojax.parallel.rules import DEFAULT_RULES, constrain, logical_to_spec, resolve_rules, use_rules

__all__ = ["MESH_AXES", "axis_sizes", "make_abstract_mesh", "make_mesh", "DEFAULT_RULES", "constrain",
           "logical_to_spec", "resolve_rules", "use_rules"]
