"""The specification of varlen_attention, in plain jnp.

For example b with L = lengths[b] valid tokens packed at the front, and each head:

    out[b, i] = sum_{j < L, (j <= i if causal)} softmax_j(q[b, i] . k[b, j] * sm_scale) v[b, j]
                                                              for i < L
    out[b, i] = 0                                             for i >= L

sm_scale defaults to 1 / sqrt(head_dim). The softmax is computed in f32; probabilities are
rounded to v's dtype before multiplying V and normalised afterwards, as the kernels do.
Masked scores use a large finite negative value, so no row is ever NaN.
"""
import math

import jax.numpy as jnp

MASK_VALUE = -1e30


def default_scale(head_dim: int) -> float:
  return 1.0 / math.sqrt(head_dim)


def varlen_attention(q, k, v, lengths, *, causal=False, sm_scale):
  """q, k, v [b, t, h, d], lengths int [b] -> [b, t, h, d]."""
  t = q.shape[1]
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * sm_scale
  pos = jnp.arange(t)
  valid = pos[None, :] < lengths[:, None]                       # [b, t]
  mask = valid[:, None, None, :]
  if causal:
    mask = mask & (pos[None, None, :, None] >= pos[None, None, None, :])
  s = jnp.where(mask, s, MASK_VALUE)
  p = jnp.where(mask, jnp.exp(s - jnp.max(s, axis=-1, keepdims=True)), 0.0)
  l = jnp.sum(p, axis=-1)                                       # [b, h, q]
  o = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  o = o / jnp.maximum(jnp.swapaxes(l, 1, 2), 1e-30)[..., None]
  return jnp.where(valid[:, :, None, None], o, 0).astype(q.dtype)
