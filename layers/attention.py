"""Causal multi-head self-attention with rotary positions and a KV cache.

softmax(q k^T / sqrt(d_head) + mask) v per head (Vaswani et al., 2017), RoPE on q and k.
In `decode` mode the module keeps `cached_key`, `cached_value` and `cache_index` in the `cache`
collection: a call with T new tokens writes them at [index, index + T) and attends to every cache
entry up to its own position. T = prompt length is a prefill, T = 1 a decode step; the cache's
length is fixed by the input length at `init` time (as in the flax lm1b example).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from layers.rope import apply_rope


def causal_mask(q_positions, k_positions):
  """[b, 1, q, k] boolean: a query sees keys at positions <= its own."""
  return (k_positions[:, None, None, :] <= q_positions[:, None, :, None])


def dot_product_attention(q, k, v, mask, dtype=jnp.float32):
  """q: [b, q, h, d], k/v: [b, k, h, d], mask: [b, 1|h, q, k] bool. Softmax in float32."""
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  scores = scores / jnp.sqrt(q.shape[-1]).astype(jnp.float32)
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def decode_attention(module: nn.Module, q, k, v, *, rope_base: float, rope_fraction: float,
                     dtype=jnp.float32):
  """The KV-cache step of an attention module in `decode` mode (shared by every attention).

  q, k, v: [b, T, h, d] projections of T new tokens, before RoPE. Declares `cached_key`,
  `cached_value` and `cache_index` in the module's `cache` collection; at `init` (no cache yet)
  returns None and the caller runs its full pass, which sizes the cache. Otherwise writes k, v
  at [index, index + T), attends every new token to the cache entries up to its own position
  and returns (out [b, T, h, d], positions [b, T]).
  """
  b, t = q.shape[:2]
  is_initialized = module.has_variable("cache", "cached_key")
  cached_key = module.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
  cached_value = module.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
  cache_index = module.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
  if not is_initialized:
    return None
  start = cache_index.value
  positions = start + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  q = apply_rope(q, positions, base=rope_base, fraction=rope_fraction)
  k = apply_rope(k, positions, base=rope_base, fraction=rope_fraction)
  keys = jax.lax.dynamic_update_slice(cached_key.value, k, (0, start, 0, 0))
  values = jax.lax.dynamic_update_slice(cached_value.value, v, (0, start, 0, 0))
  cached_key.value, cached_value.value = keys, values
  cache_index.value = start + t
  max_len = keys.shape[1]
  k_positions = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), (b, max_len))
  out = dot_product_attention(q, keys, values, causal_mask(positions, k_positions), dtype)
  return out, positions


class MultiHeadAttention(nn.Module):
  num_heads: int
  head_dim: int
  rope_base: float = 10000.0
  rope_fraction: float = 1.0
  dtype: DTypeLike = jnp.float32
  param_dtype: DTypeLike = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x, positions, *, decode: bool = False):
    """x: [b, t, d]; positions: [b, t] absolute positions (ignored in decode mode)."""
    b, t, d = x.shape
    h, hd = self.num_heads, self.head_dim

    def dense(name, shape, axes):
      return self.param(name, nn.with_logical_partitioning(self.kernel_init, axes),
                        shape, self.param_dtype).astype(self.dtype)

    wq = dense("query", (d, h, hd), ("embed", "heads", "kv"))
    wk = dense("key", (d, h, hd), ("embed", "heads", "kv"))
    wv = dense("value", (d, h, hd), ("embed", "heads", "kv"))
    wo = dense("out", (h, hd, d), ("heads", "kv", "embed"))
    q = jnp.einsum("btd,dhk->bthk", x, wq)
    k = jnp.einsum("btd,dhk->bthk", x, wk)
    v = jnp.einsum("btd,dhk->bthk", x, wv)

    if decode:
      cached = decode_attention(self, q, k, v, rope_base=self.rope_base,
                                rope_fraction=self.rope_fraction, dtype=self.dtype)
      if cached is not None:
        out, positions = cached
        self._sow_macs(b, t, d, positions + 1)
        return jnp.einsum("bthk,hkd->btd", out, wo)

    q = apply_rope(q, positions, base=self.rope_base, fraction=self.rope_fraction)
    k = apply_rope(k, positions, base=self.rope_base, fraction=self.rope_fraction)
    q = nn.with_logical_constraint(q, ("act_batch", "act_length", "act_heads", "act_kv"))
    k = nn.with_logical_constraint(k, ("act_batch", "act_length", "act_heads", "act_kv"))
    out = dot_product_attention(q, k, v, causal_mask(positions, positions), self.dtype)
    self._sow_macs(b, t, d, positions + 1)
    return jnp.einsum("bthk,hkd->btd", out, wo)

  def _sow_macs(self, b, t, d, visible_keys):
    """Per-token MACs: q/k/v/out projections plus scores and weighted sum over visible keys."""
    inner = self.num_heads * self.head_dim
    macs = 4 * d * inner + 2 * inner * visible_keys.astype(jnp.float32)
    self.sow("intermediates", "macs", jnp.broadcast_to(macs, (b, t)))
