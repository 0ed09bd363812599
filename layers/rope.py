"""Rotary position embedding (Su et al., 2021, RoFormer).

Feature pairs of the first `fraction` of each head's features (rotary_dim of them) are rotated by
the angle position * base^(-2i / rotary_dim); the rest pass through (TokenFormer and GPT-NeoX-style
partial rotary). Two layouts pair the features differently:
  'interleaved': pairs (x[2i], x[2i+1]) (RoFormer, the default of every adacomp config);
  'half':        pairs (x[i], x[i + rotary_dim/2]) ("rotate half": Llama, Qwen2, Mistral, NeoX).
"""
import jax.numpy as jnp

ROPE_LAYOUTS = ("interleaved", "half")


def apply_rope(x, positions, *, base: float = 10000.0, fraction: float = 1.0,
               layout: str = "interleaved"):
  """x: [batch, length, heads, head_dim]; positions: [batch, length] integer positions."""
  if layout not in ROPE_LAYOUTS:
    raise ValueError(f"Unknown RoPE layout {layout!r}; use one of {ROPE_LAYOUTS} "
                     f"(DecoderConfig.rope_layout).")
  head_dim = x.shape[-1]
  rotary_dim = int(head_dim * fraction) // 2 * 2
  if rotary_dim == 0:
    return x
  inv_freq = base ** (-jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim)
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [b, l, rotary_dim/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  rot, rest = x[..., :rotary_dim].astype(jnp.float32), x[..., rotary_dim:]
  if layout == "interleaved":
    even, odd = rot[..., 0::2], rot[..., 1::2]
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    rotated = rotated.reshape(rot.shape)
  else:
    first, second = rot[..., :rotary_dim // 2], rot[..., rotary_dim // 2:]
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return jnp.concatenate([rotated.astype(x.dtype), rest], axis=-1)
