"""Sorting tokens by route before routed_ffn, and back after (the MaxText pattern).

`sort_by_route` stably sorts rows so that route 0 comes first, then route 1, ..., and every row
whose route lies outside [0, num_groups) (e.g. -1) goes last: the skip group. The permutation is
a gather whose VJP is the inverse gather (the cheap unsort), not a scatter-add.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp


class RouteSort(NamedTuple):
  order: jax.Array        # int32 [m]: sorted row i is input row order[i]
  inverse: jax.Array      # int32 [m]: input row j is sorted row inverse[j]
  group_sizes: jax.Array  # int32 [num_groups]: rows per routed group; the rest are skipped


@jax.custom_vjp
def permute_rows(x: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
  """x[index] for a permutation `index` whose inverse is `inverse`."""
  return jnp.take(x, index, axis=0)


def _permute_fwd(x, index, inverse):
  return jnp.take(x, index, axis=0), inverse


def _permute_bwd(inverse, g):
  return jnp.take(g, inverse, axis=0), None, None


permute_rows.defvjp(_permute_fwd, _permute_bwd)


def route_sort(routes: jax.Array, num_groups: int) -> RouteSort:
  """The permutation that groups rows by route, skipped rows (route outside range) last."""
  routes = routes.astype(jnp.int32)
  key = jnp.where((routes >= 0) & (routes < num_groups), routes, num_groups)
  order = jnp.argsort(key, stable=True).astype(jnp.int32)
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=jnp.int32))
  sizes = jnp.bincount(key, length=num_groups + 1)[:num_groups].astype(jnp.int32)
  return RouteSort(order, inverse, sizes)


def sort_by_route(x: jax.Array, routes: jax.Array, num_groups: int):
  """(x sorted by route [m, d], RouteSort). routes int [m]; out-of-range routes are skipped."""
  rs = route_sort(routes, num_groups)
  return permute_rows(x, rs.order, rs.inverse), rs


def unsort_by_route(y: jax.Array, rs: RouteSort) -> jax.Array:
  """Rows of `y` (in sorted order) back to the input order."""
  return permute_rows(y, rs.inverse, rs.order)
