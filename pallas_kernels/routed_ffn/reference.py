"""The specification of routed_ffn and of its two grouped matmuls, in plain jnp.

Rows of `x` are sorted by group: group g holds rows [starts[g], ends[g]) with
ends = cumsum(group_sizes), starts = ends - group_sizes; rows from sum(group_sizes) to m are the
skip group and produce 0. Group g uses the first widths[g] hidden units of its padded weights:

    out[r] = act(x[r] @ w_in[g][:, :widths[g]]) @ w_out[g][:widths[g], :]    for r in group g
    out[r] = 0                                                               for r in no group

Every group is evaluated on every row and masked: obviously right, and E times the dense cost.
Rounding follows the kernels: f32 accumulation, the hidden pre-activation and activation stored
in the input dtype.
"""
import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# The activations of routed_ffn, named as layers.mlp names them so that a model's FFN and the
# kernel compute one function: "gelu" is the exact (erf) GeLU every config uses. The activation
# runs in XLA between the grouped matmuls (composed.py), so no kernel needs an erf of its own.
ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"routed_ffn: unknown activation {name!r}; choose one of "
                     f"{sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


def _nbytes(shape, dtype) -> int:
  return math.prod(shape) * jnp.dtype(dtype).itemsize


def gmm_cost(lhs, rhs, n: int) -> pl.CostEstimate:
  """XLA's estimate of a gmm: the bound of every row multiplied by one full group matrix (the
  real work is lower by the skipped rows and the width limits, which are traced values)."""
  m, k = lhs.shape
  return pl.CostEstimate(flops=2 * m * k * n, transcendentals=0, bytes_accessed=(
      _nbytes(lhs.shape, lhs.dtype) + _nbytes(rhs.shape, rhs.dtype)
      + _nbytes((m, n), lhs.dtype)))


def tgmm_cost(lhs, rhs, e: int, out_dtype) -> pl.CostEstimate:
  """XLA's estimate of a tgmm: every row's outer product added once (to its group's output)."""
  (m, a), b = lhs.shape, rhs.shape[1]
  return pl.CostEstimate(flops=2 * m * a * b, transcendentals=0, bytes_accessed=(
      _nbytes(lhs.shape, lhs.dtype) + _nbytes(rhs.shape, rhs.dtype)
      + _nbytes((e, a, b), out_dtype)))


def group_bounds(group_sizes: jax.Array, m: int):
  """(starts, ends) int32 [E]; ends are clipped to m, so oversized groups cannot run past x."""
  ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  return starts, ends


def _row_group_mask(group_sizes, m):
  """Bool [E, m]: row r belongs to group g."""
  starts, ends = group_bounds(group_sizes, m)
  rows = jnp.arange(m)[None, :]
  return (rows >= starts[:, None]) & (rows < ends[:, None])


def _limit(limit: Optional[jax.Array], e: int, size: int) -> jax.Array:
  return jnp.full((e,), size, jnp.int32) if limit is None else limit.astype(jnp.int32)


def gmm(lhs, rhs, group_sizes, *, k_limit=None, n_limit=None, transpose_rhs=False):
  """out[r] = lhs[r, :k_limit[g]] @ rhs[g][:k_limit[g], :n_limit[g]] (zero past n_limit)."""
  m, k = lhs.shape
  e = rhs.shape[0]
  rhs = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
  n = rhs.shape[2]
  k_limit, n_limit = _limit(k_limit, e, k), _limit(n_limit, e, n)
  member = _row_group_mask(group_sizes, m)
  out = jnp.zeros((m, n), jnp.float32)
  for g in range(e):
    k_ok = jnp.arange(k) < k_limit[g]
    n_ok = jnp.arange(n) < n_limit[g]
    w = jnp.where(k_ok[:, None] & n_ok[None, :], rhs[g], 0)
    y = jnp.dot(jnp.where(k_ok[None, :], lhs, 0), w, preferred_element_type=jnp.float32)
    out = out + jnp.where(member[g][:, None], y, 0)
  return out.astype(lhs.dtype)


def tgmm(lhs, rhs, group_sizes, *, a_limit=None, b_limit=None, out_dtype=None):
  """out[g] = lhs[rows of g]^T @ rhs[rows of g], zero past a_limit[g] / b_limit[g]: [E, A, B]."""
  m, a = lhs.shape
  b = rhs.shape[1]
  e = group_sizes.shape[0]
  a_limit, b_limit = _limit(a_limit, e, a), _limit(b_limit, e, b)
  member = _row_group_mask(group_sizes, m)
  outs = []
  for g in range(e):
    x = jnp.where(member[g][:, None], lhs, 0)
    y = jnp.where(member[g][:, None], rhs, 0)
    p = jnp.dot(x.T, y, preferred_element_type=jnp.float32)
    ok = (jnp.arange(a)[:, None] < a_limit[g]) & (jnp.arange(b)[None, :] < b_limit[g])
    outs.append(jnp.where(ok, p, 0))
  return jnp.stack(outs).astype(out_dtype or lhs.dtype)


def routed_ffn(x, group_sizes, w_in, w_out, widths, *, activation="gelu"):
  """The routed FFN: see the module docstring. x [m, d] -> [m, d]."""
  act = activation_fn(activation)
  m, _ = x.shape
  e, _, f = w_in.shape
  member = _row_group_mask(group_sizes, m)
  out = jnp.zeros(x.shape, jnp.float32)
  for g in range(e):
    unit = jnp.arange(f) < widths[g]
    w_in_g = jnp.where(unit[None, :], w_in[g], 0)
    w_out_g = jnp.where(unit[:, None], w_out[g], 0)
    pre = jnp.dot(x, w_in_g, preferred_element_type=jnp.float32).astype(x.dtype)
    h = act(pre.astype(jnp.float32)).astype(x.dtype)
    y = jnp.dot(h, w_out_g.astype(x.dtype), preferred_element_type=jnp.float32)
    out = out + jnp.where(member[g][:, None], y, 0)
  return out.astype(x.dtype)
