"""Running a kernel per shard of the device mesh in context (`jax.shard_map` at the op boundary).

XLA cannot partition a Pallas kernel: Mosaic refuses ("Mosaic kernels cannot be automatically
partitioned. Please wrap the call in a shard_map."), and a Triton custom call is replicated with
its operands all-gathered. So every op that runs a kernel partitions itself here, over the mesh
the caller set with `jax.set_mesh(mesh)` (adacomp's training and evaluation do; inside jit
`jax.sharding.get_abstract_mesh()` returns it):

  rows     an op's token rows are split over the batch axes (`BATCH_AXES`, data and fsdp, in
           that order, as `PartitionSpec(("data", "fsdp"))` splits a batch) when their shard
           count divides the row count; otherwise every shard computes all rows (replicated:
           correct, no saving; e.g. a decode step of one sequence on a data-parallel mesh).
  weights  enter as the layer holds them, gathered over fsdp (as XLA gathers an fsdp-sharded
           weight for any matmul), and split over `TENSOR_AXIS` on the one dimension an op
           allows, with the reduction that split needs written out by the op (a psum).
  rows of an index  an op whose indices address rows (gather_matmul, scatter) gets each shard's
           own block of rows and of indices; `local_rows` turns global row numbers into the
           shard's. A shard's indices must address its own rows: routing is per sequence row
           (informed routing and MoD pick k of each row's t tokens), and a whole row lives on
           one shard, so a shard's capacity is its rows' capacities, k per row, never a top-k
           across rows, shards or hosts.

No mesh in context (or only axes of size one, or only axes already manual because the caller is
itself inside a shard_map): the op runs unpartitioned, as before. `impl="xla"` never comes here:
the reference is plain jnp, which XLA partitions itself.
"""
import dataclasses
import math
from typing import Callable, Optional, Tuple

import jax
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
TENSOR_AXIS = "tensor"


@dataclasses.dataclass(frozen=True)
class Split:
  """How one call is partitioned: the mesh, the axes splitting its rows, the tensor axis."""
  mesh: jax.sharding.AbstractMesh
  rows: Tuple[str, ...]     # mesh axes the rows are split over, major first (may be empty)
  tensor: Optional[str]     # TENSOR_AXIS when the op's splittable dimension is split over it

  @property
  def row_spec(self):
    """The PartitionSpec entry of a row dimension."""
    return self.rows or None


def _auto_axes(mesh) -> dict:
  """The axes the op may make manual (those not manual already), with their sizes."""
  manual = set(getattr(mesh, "manual_axes", ()))
  return {a: s for a, s in mesh.shape.items() if a not in manual}


def _free_axes(mesh) -> dict:
  """The axes of size > 1 among them: the ones that split anything."""
  return {a: s for a, s in _auto_axes(mesh).items() if s > 1}


def split_for(row_counts, tensor_dim: Optional[int] = None) -> Optional[Split]:
  """The partition of a call whose row dimensions have `row_counts` rows each (all split
  alike) and whose tensor-splittable dimension (None: none) has `tensor_dim` entries.

  Returns None when there is nothing to partition: no mesh, or no axis of size > 1 left.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  free = _free_axes(mesh)
  if not free:
    return None
  rows = tuple(a for a in BATCH_AXES if a in free)
  shards = math.prod(free[a] for a in rows)
  if any(count % shards for count in row_counts):
    rows = ()
  tensor = None
  if tensor_dim is not None and TENSOR_AXIS in free and tensor_dim % free[TENSOR_AXIS] == 0:
    tensor = TENSOR_AXIS
  return Split(mesh, rows, tensor)


def shard_index(split: Split) -> jax.Array:
  """Inside the body: this shard's position along the row split (0 when rows are not split)."""
  index = 0
  for axis in split.rows:
    index = index * split.mesh.shape[axis] + jax.lax.axis_index(axis)
  return index


def local_rows(split: Split, idx: jax.Array, rows_per_shard: int) -> jax.Array:
  """Global row numbers of this shard's own rows -> row numbers within the shard's block."""
  if not split.rows:
    return idx
  return idx - shard_index(split) * rows_per_shard


def shard(body: Callable, split: Split, in_specs, out_specs) -> Callable:
  """`body` per shard under `split.mesh`: every axis not manual already becomes manual (size-one
  axes too: the kernel interpreters' callbacks need a fully manual region), replicated where a
  spec does not name it. check_vma stays on, so autodiff through the psums is exact."""
  return jax.shard_map(body, mesh=split.mesh, in_specs=in_specs, out_specs=out_specs,
                       axis_names=frozenset(_auto_axes(split.mesh)))


__all__ = ["BATCH_AXES", "TENSOR_AXIS", "Split", "split_for", "shard_index", "local_rows",
           "shard", "P"]
