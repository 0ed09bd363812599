"""Device mesh, logical-axis rules and multi-process start-up.

One SPMD program: a `Mesh` with axes (data, fsdp, tensor); parameters and activations carry
logical axis names (see `layers/`) that `DEFAULT_RULES` maps to mesh axes. `data` and `fsdp` both
split the batch; `fsdp` also shards parameters along their `embed` axis (ZeRO-3 style), and
`tensor` splits heads, MLP hidden units and the vocabulary (Megatron style).
"""
from typing import Optional, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("act_batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("act_mlp", "tensor"),
    ("heads", "tensor"),
    ("act_heads", "tensor"),
    ("vocab", "tensor"),
    ("act_vocab", "tensor"),
    ("kv", None),
    ("act_kv", None),
    ("act_length", None),
    ("act_embed", None),
    ("layers", None),
    ("norm", None),
)


@gin.configurable
def logical_axis_rules(rules: Sequence = DEFAULT_RULES):
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


@gin.configurable
def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over all devices; one axis may be -1 (all remaining)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = [data, fsdp, tensor]
  if shape.count(-1) > 1:
    raise ValueError(f"make_mesh: at most one axis may be -1, got data={data}, fsdp={fsdp}, "
                     f"tensor={tensor}.")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"make_mesh: {len(devices)} devices cannot be split into "
                       f"data={data} x fsdp={fsdp} x tensor={tensor}; make the fixed axes divide "
                       f"the device count.")
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"make_mesh: data x fsdp x tensor = {'x'.join(map(str, shape))} does not "
                     f"match the {len(devices)} available devices; set make_mesh.data = -1 to fill.")
  try:
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    device_array = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over data and fsdp, everything else replicated."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles each process's rows into global arrays sharded along the batch."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def logical_shardings(abstract_tree, mesh: Mesh, rules):
  """NamedShardings for a (boxed) abstract pytree from its logical partition specs."""
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract_tree), mesh, rules)


def strip_boxes(tree):
  """The values of a tree of partitioning boxes, without the sharding constraint `unbox` adds."""
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x, tree,
                      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def abstract_with_shardings(boxed_abstract, shardings):
  """ShapeDtypeStructs carrying their target shardings (restore targets for orbax)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      strip_boxes(boxed_abstract), shardings)


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, auto: bool = False) -> None:
  """Joins a multi-process run; a no-op for a single process.

  Explicit arguments join a run on localhost or a cluster (CPU collectives go through gloo);
  `auto=True` lets jax detect TPU pods and SLURM/MPI clusters.
  """
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id too.")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif auto:
    jax.distributed.initialize()
  else:
    return
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
