"""Parallelism: the device mesh, logical-axis sharding rules, sharded training and multi-host.

`mesh.py` builds the 4-axis mesh from `MeshConfig`; `rules.py` maps the model's logical axis
names to mesh axes; `sharded_train.py` turns a config + mesh into an initial sharded
TrainState and a jitted step; `distributed.py` joins a multi-host job; `memory.py` estimates
per-device bytes from shardings without devices.
"""

from nemojax.parallel.mesh import MESH_AXES, axis_sizes, make_abstract_mesh, make_mesh
from nemojax.parallel.rules import DEFAULT_RULES, constrain, logical_to_spec, resolve_rules, use_rules

__all__ = ["MESH_AXES", "axis_sizes", "make_abstract_mesh", "make_mesh", "DEFAULT_RULES", "constrain",
           "logical_to_spec", "resolve_rules", "use_rules"]
