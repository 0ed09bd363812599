"""Token selection shared by the routed layers (Duo-LLM, informed routing, Mixture-of-Depths).

Static capacities (jit needs fixed shapes: a data-dependent count becomes a number of slots),
top-k choices of which tokens fill them, the buckets of slots that let a data-dependent count
(causal routing, Duo's ragged path) run on about its own number of rows, and the
straight-through surrogate that lets a router learn from a hard decision.
"""
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp


def capacity_tokens(fraction: Optional[float], num_tokens: int) -> int:
  """Static slots for a capacity fraction of `num_tokens`, rounded up (None: all tokens)."""
  if fraction is None:
    return num_tokens
  # Round to 6 decimals first: float noise (0.3 * 10 = 3.0000000000000004) must not add a slot.
  # Then round up: a positive capacity must not vanish on a one-token decoding step.
  return max(0, min(num_tokens, math.ceil(round(fraction * num_tokens, 6))))


BUCKET_ALIGN = 16  # slots: multiples of 16 rows (and powers of two below)
BUCKET_REL = 16    # the step between buckets: about 1 / 16 of the count


def bucket_sizes(n: int):
  """Static slot counts for a data-dependent count in [0, n]: 0, 1, 2, 4, 8, then multiples of
  16 whose step grows with the size (16 * ceil(s / 256)), and n. A count c >= 16 pays fewer
  than 16 * ceil(c / 256) padded slots: at most 15 up to 256, under 1/8 of c above it, tending
  to 1/16 of c for large counts (not a fixed fraction of n: a 75%-sparse layer executes a
  quarter of n, where steps of n / 16 padded up to 25%); a count below 16 at most itself.
  About 11 branches per doubling of n above 1024 (40 at n = 1024, 72 at 8192)."""
  sizes, size = {0, n}, 1
  while size < min(BUCKET_ALIGN, n):
    sizes.add(size)
    size *= 2
  size = BUCKET_ALIGN
  while size < n:
    sizes.add(size)
    size += BUCKET_ALIGN * -(-size // (BUCKET_ALIGN * BUCKET_REL))
  return sorted(sizes)


def bucketed(count, n: int, branch, sizes=None):
  """branch(slots) for the smallest bucket `slots` >= count (a traced int), via lax.switch:
  only the chosen branch runs, so the work follows the count (`bucket_sizes`' steps, or the
  sorted `sizes` given, which must end at n). Every branch is compiled: fewer sizes compile
  faster and pad more."""
  sizes = bucket_sizes(n) if sizes is None else sizes
  index = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), count.astype(jnp.int32))
  return jax.lax.switch(index, [functools.partial(branch, size) for size in sizes])


def first_by_priority(priority: jax.Array, k: int):
  """Picks the k highest-priority tokens among those with priority > 0.

  Returns (idx int32 [k] distinct, valid bool [k], taken bool [n]); slots beyond the number of
  candidates hold non-candidates with valid False.
  """
  n = priority.shape[0]
  if k == 0:
    return jnp.zeros((0,), jnp.int32), jnp.zeros((0,), bool), jnp.zeros((n,), bool)
  values, idx = jax.lax.top_k(priority, k)
  # top_k fills every slot; a slot whose priority is 0 took a non-candidate and must do nothing.
  valid = values > 0
  return idx, valid, jnp.zeros((n,), bool).at[idx].set(valid)


def select_top_k(scores, k: int):
  """Per-sequence top k of scores [b, t].

  Returns (executed bool [b, t], exec_idx int32 [b, k], rest_idx int32 [b, t - k]): the
  executed positions by descending score (ties: earlier position first) and the others.
  """
  # A stable sort breaks ties by position, so equal scores (e.g. an untrained router) choose
  # the same tokens on every backend.
  order = jnp.argsort(-scores, axis=1, stable=True).astype(jnp.int32)
  exec_idx, rest_idx = order[:, :k], order[:, k:]
  rows = jnp.arange(scores.shape[0])[:, None]
  executed = jnp.zeros(scores.shape, bool).at[rows, exec_idx].set(True)
  return executed, exec_idx, rest_idx


def flat_indices(idx, t: int):
  """Per-sequence indices [b, k] -> indices into the b*t tokens flattened batch-major."""
  return (idx + t * jnp.arange(idx.shape[0], dtype=jnp.int32)[:, None]).reshape(-1)


def straight_through_zero(soft):
  """soft - stop_gradient(soft): zero in value, d/d soft = 1.

  Multiplying a module's output by this adds nothing to the forward pass, so a hard routing
  decision is computed exactly, while the backward pass sends the router the gradient it would
  get if the output were weighted by its soft probability.
  """
  return soft - jax.lax.stop_gradient(soft)
