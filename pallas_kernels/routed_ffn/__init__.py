"""routed_ffn: each group of rows runs its own FFN; skipped rows do no work.

    out[r] = act(x[r] @ w_in[g][:, :widths[g]]) @ w_out[g][:widths[g], :]   for r in group g
    out[r] = 0                                                              for skipped rows

Layout (megablox style). x [m, d] is sorted by group: group g holds rows
[offsets[g], offsets[g+1]) with offsets = [0, cumsum(group_sizes)]; the rows from
sum(group_sizes) to m are the skip group, which has no weights; its rows get 0 (the caller adds
the residual) and its row tiles are never computed. `sort_by_route` / `unsort_by_route` produce
and undo this order from per-token routes.

Weights of different hidden widths are padded to the widest, F: w_in [E, d, F], w_out [E, F, d],
and widths [E] (int, default F) says how many hidden units group g really has. Units past a
group's width are ignored whatever they hold (their gradient is 0) and cost no matmul on TPU/GPU
beyond the partial last block. `stack_ffn_weights` pads a list of (w_in, w_out) pairs. Weights are
cast to x.dtype (mixed precision); accumulation is f32.

Duo-LLM's skip / small / big is E = 2 (small, big) plus the skip rows; any number of experts
of different widths works the same way. There is no capacity and no overflow: the kernels size
their grids for the worst case, so every routed row is computed whatever the group sizes.

Gradients: a custom VJP whose backward is four more grouped matmuls (composed.py), so training
also skips skipped rows. Blocks (block_m, block_k, block_n; None = the backend's default) are
described in tpu.py and gpu.py.

Per-token routes: `ffn_by_route(x, routes, ...)` sorts the rows by route, runs routed_ffn and
unsorts, and is the form that partitions. Under a device mesh in context (`jax.set_mesh`; inside
jit `jax.sharding.get_abstract_mesh()`), it runs per shard with `jax.shard_map` (XLA cannot
partition a Mosaic kernel, and replicates a Triton one): the rows are split over the batch axes
(data, fsdp) when their shard count divides the row count (else every shard takes all rows),
each shard sorts and computes its own rows (there is no capacity, so a shard's result is its
rows' result, whatever the split); the weights come in as the layer holds them, gathered over
fsdp and split over `tensor` on the hidden units F (each shard runs its F / tensor units, its
widths clipped to them, and a psum over tensor adds the partial outputs: exact, because a
unit's contribution is independent of the others). routed_ffn itself takes rows already sorted
with global group sizes, which a row split would break, so it does not partition on its own.
impl "xla" stays plain jnp, which XLA partitions itself.
"""
import math
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels import _dispatch
from pallas_kernels.routed_ffn import gpu
from pallas_kernels.routed_ffn import reference
from pallas_kernels.routed_ffn import tpu
from pallas_kernels.routed_ffn.routing import RouteSort
from pallas_kernels.routed_ffn.routing import route_sort
from pallas_kernels.routed_ffn.routing import sort_by_route
from pallas_kernels.routed_ffn.routing import unsort_by_route


def stack_ffn_weights(pairs: Sequence[Tuple[jax.Array, jax.Array]]):
  """[(w_in [d, f_g], w_out [f_g, d]), ...] -> (w_in [E, d, F], w_out [E, F, d], widths [E])."""
  widest = max(w_in.shape[1] for w_in, _ in pairs)
  w_in = jnp.stack([jnp.pad(a, ((0, 0), (0, widest - a.shape[1]))) for a, _ in pairs])
  w_out = jnp.stack([jnp.pad(b, ((0, widest - b.shape[0]), (0, 0))) for _, b in pairs])
  widths = jnp.array([a.shape[1] for a, _ in pairs], jnp.int32)
  return w_in, w_out, widths


def _check_shapes(x, group_sizes, w_in, w_out, widths):
  m, d = x.shape
  e, d_in, f = w_in.shape
  if d_in != d or w_out.shape != (e, f, d):
    raise ValueError(f"routed_ffn: x {x.shape} needs w_in [E, {d}, F] and w_out [E, F, {d}]; "
                     f"got w_in {w_in.shape}, w_out {w_out.shape}.")
  if group_sizes.shape != (e,) or widths.shape != (e,):
    raise ValueError(f"routed_ffn: group_sizes {group_sizes.shape} and widths {widths.shape} "
                     f"must both be [{e}] (one entry per weighted group).")


def routed_ffn(x: jax.Array, group_sizes: jax.Array, w_in: jax.Array, w_out: jax.Array,
               widths: Optional[jax.Array] = None, *, activation: str = "gelu",
               impl: Optional[str] = None, block_m: Optional[int] = None,
               block_k: Optional[int] = None, block_n: Optional[int] = None) -> jax.Array:
  """Routed FFN of rows sorted by group (see module docstring): x [m, d] -> [m, d].

  Args:
    x: [m, d] rows sorted by group, skipped rows last.
    group_sizes: int [E] rows per weighted group; sum <= m, the rest are skipped.
    w_in, w_out: [E, d, F] and [E, F, d], padded to the widest group.
    widths: int [E] hidden units per group (default F for all).
    activation: "gelu" (exact, erf), "gelu_tanh", "relu" or "silu" (reference.ACTIVATIONS).
    impl: None, "auto", "xla", "pallas", "interpret" or "interpret_gpu" (see _dispatch).
    block_m, block_k, block_n: kernel tiles; None keeps the backend's default.
  """
  e, _, f = w_in.shape
  group_sizes = jnp.asarray(group_sizes, jnp.int32)
  widths = jnp.full((e,), f, jnp.int32) if widths is None else jnp.asarray(widths, jnp.int32)
  _check_shapes(x, group_sizes, w_in, w_out, widths)
  blocks = {k: v for k, v in dict(block_m=block_m, block_k=block_k, block_n=block_n).items()
            if v is not None}
  return _dispatch.dispatch(
      impl, x, group_sizes, w_in.astype(x.dtype), w_out.astype(x.dtype), widths,
      reference=lambda *a: reference.routed_ffn(*a, activation=activation),
      tpu=lambda *a, interpret: tpu.routed_ffn(*a, activation=activation, interpret=interpret,
                                               **blocks),
      gpu=lambda *a, interpret: gpu.routed_ffn(*a, activation=activation, interpret=interpret,
                                               **blocks))


BATCH_AXES = ("data", "fsdp")
TENSOR_AXIS = "tensor"


def _mesh_split(rows: int, units: int):
  """(mesh, row axes, tensor axis or None) for a call under the mesh in context, or None when
  nothing is split (no mesh, or no axis of size > 1 left that is not manual already)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  manual = set(getattr(mesh, "manual_axes", ()))
  free = {a: n for a, n in mesh.shape.items() if a not in manual and n > 1}
  if not free:
    return None
  row_axes = tuple(a for a in BATCH_AXES if a in free)
  if rows % math.prod(free[a] for a in row_axes):
    row_axes = ()
  tensor = TENSOR_AXIS if TENSOR_AXIS in free and units % free[TENSOR_AXIS] == 0 else None
  return mesh, row_axes, tensor


def ffn_by_route(x: jax.Array, routes: jax.Array, w_in: jax.Array, w_out: jax.Array,
                 widths: Optional[jax.Array] = None, *, activation: str = "gelu",
                 impl: Optional[str] = None, **blocks) -> jax.Array:
  """Row r of x [m, d] through group routes[r]'s FFN (0 for a route outside [0, E)): sort,
  routed_ffn, unsort, per shard of the mesh in context (see the module docstring)."""
  e, _, f = w_in.shape
  widths = jnp.full((e,), f, jnp.int32) if widths is None else jnp.asarray(widths, jnp.int32)

  def local(x, routes, w_in, w_out, widths):
    rows, order = sort_by_route(x, routes, e)
    y = routed_ffn(rows, order.group_sizes, w_in, w_out, widths, activation=activation,
                   impl=impl, **blocks)
    return unsort_by_route(y, order)

  split = None if _dispatch.resolve(impl) == "xla" else _mesh_split(x.shape[0], f)
  if split is None:
    return local(x, routes, w_in, w_out, widths)
  mesh, row_axes, tensor = split

  def per_shard(x, routes, w_in, w_out, widths):
    if tensor is None:
      return local(x, routes, w_in, w_out, widths)
    units = w_in.shape[2]
    first = jax.lax.axis_index(tensor) * units
    y = local(x, routes, w_in, w_out, jnp.clip(widths - first, 0, units))
    return jax.lax.psum(y, tensor)

  row_dim = row_axes or None
  manual = frozenset(a for a in mesh.shape if a not in set(getattr(mesh, "manual_axes", ())))
  # Every free axis becomes manual (size-one ones too: the interpreters' callbacks need a fully
  # manual region); weights are replicated over all but `tensor`.
  return jax.shard_map(
      per_shard, mesh=mesh, axis_names=manual, out_specs=P(row_dim, None),
      in_specs=(P(row_dim, None), P(row_dim), P(None, None, tensor), P(None, tensor, None),
                P()))(x, jnp.asarray(routes, jnp.int32), w_in.astype(x.dtype),
                      w_out.astype(x.dtype), widths)


__all__ = ["routed_ffn", "ffn_by_route", "sort_by_route", "unsort_by_route", "route_sort", "RouteSort",
           "stack_ffn_weights"]
