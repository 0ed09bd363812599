"""Rotary position embedding (Su et al., 2021, RoFormer).

Pairs (x[2i], x[2i+1]) of the first `fraction` of each head's features are rotated by the angle
position * base^(-2i / rotary_dim); the rest pass through (TokenFormer uses fraction 0.25).
"""
import jax.numpy as jnp


def apply_rope(x, positions, *, base: float = 10000.0, fraction: float = 1.0):
  """x: [batch, length, heads, head_dim]; positions: [batch, length] integer positions."""
  head_dim = x.shape[-1]
  rotary_dim = int(head_dim * fraction) // 2 * 2
  if rotary_dim == 0:
    return x
  inv_freq = base ** (-jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim)
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [b, l, rotary_dim/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  rot, rest = x[..., :rotary_dim].astype(jnp.float32), x[..., rotary_dim:]
  even, odd = rot[..., 0::2], rot[..., 1::2]
  rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
  rotated = rotated.reshape(rot.shape).astype(x.dtype)
  return jnp.concatenate([rotated, rest], axis=-1)
