"""Causal multi-head self-attention with rotary positions and a KV cache.

softmax(q k^T / sqrt(d_head) + mask) v per head (Vaswani et al., 2017), RoPE on q and k.
Options the pretrained families need (Llama, Qwen2, Mistral, GPT-2, OPT): grouped-query attention
(`num_kv_heads` < `num_heads`: query head i reads key/value head i // (num_heads / num_kv_heads),
Ainslie et al., 2023), biases on the q/k/v and output projections, a sliding window (a query
sees the `window` latest keys, itself included) and the RoPE layout (layers.rope).
In `decode` mode the module keeps `cached_key`, `cached_value` and `cache_index` in the `cache`
collection: a call with T new tokens writes them at [index, index + T) and attends to every cache
entry up to its own position. T = prompt length is a prefill, T = 1 a decode step; the cache's
length is fixed by the input length at `init` time (as in the flax lm1b example).
The full (non-decode) pass splits the queries into n causal blocks of at least `causal_block`
rows (128; n <= 8, see causal_blocks) when there are at least two: block i attends key blocks
0..i only, so the scores and value products execute (n + 1) / 2n of the t x t square (3/4 at
t = 256, 5/8 at 512) and the result is the same function (what it saves on the CPU:
benchmarks/README.md, Research widths).
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from layers.rope import apply_rope


def causal_mask(q_positions, k_positions, window: Optional[int] = None):
  """[b, 1, q, k] boolean: a query sees keys at positions <= its own (and, with a `window`,
  > its own - window)."""
  mask = k_positions[:, None, None, :] <= q_positions[:, None, :, None]
  if window is not None:
    mask &= k_positions[:, None, None, :] > q_positions[:, None, :, None] - window
  return mask


CAUSAL_BLOCK = 128
MAX_CAUSAL_BLOCKS = 8  # (n + 1) / 2n: 9/16 of the square at 8, and a bounded number of programs


def causal_blocks(t: int, block: int = CAUSAL_BLOCK) -> int:
  """How many causal query blocks a self-attention over t tokens splits into (1: none): the
  most n <= MAX_CAUSAL_BLOCKS that divides t with blocks of at least `block` rows (256 -> 2,
  512 -> 4, 2048 -> 8 blocks of 256 at block 128); block <= 0 turns them off."""
  if block <= 0:
    return 1
  for n in range(min(t // block, MAX_CAUSAL_BLOCKS), 1, -1):
    if t % n == 0:
      return n
  return 1


def dot_product_attention(q, k, v, mask, dtype=jnp.float32, blocks: int = 1):
  """q: [b, q, h, d], k/v: [b, k, kv, d] with kv dividing h (kv < h: grouped-query attention),
  mask: [b, 1|h, q, k] bool. Softmax in float32.

  blocks > 1 (causal self-attention only: q and k are the same tokens, and the mask hides
  every key after its query in index order, as causal_mask does for positions that increase
  along the sequence): query block i of q/blocks rows reads key blocks 0..i only, so the
  scores and value products execute (blocks + 1) / (2 blocks) of the q x k square instead of
  all of it, the same function (a key the mask hides contributes exp(min - max) = 0 exactly).

  Written for XLA's CPU and GPU dot emitters: the probabilities stay unnormalised through the
  value product (exp(s - max) @ v, then one division per query row instead of one per score)
  and both products keep the heads leading ([b, h, q, *], transposed to [b, q, h, d] at the
  end). The same function as softmax(s) @ v; on the 2-core CPU at b 4, t 256, 16 heads of 64,
  34.6 ms -> 6.7 ms (benchmarks/README.md, Research widths).
  """
  if blocks > 1:
    tq, tk = q.shape[1], k.shape[1]
    if tq != tk or tq % blocks:
      raise ValueError(f"blocks={blocks} needs self-attention with the query length {tq} a "
                       f"multiple of it (keys: {tk}); use blocks=1.")
    size = tq // blocks
    return jnp.concatenate([
        dot_product_attention(q[:, i * size:(i + 1) * size], k[:, :(i + 1) * size],
                              v[:, :(i + 1) * size],
                              mask[:, :, i * size:(i + 1) * size, :(i + 1) * size], dtype)
        for i in range(blocks)], axis=1)
  b, tq, h, d = q.shape
  kv, tk = k.shape[2], k.shape[1]
  if kv != h:
    q = q.reshape(b, tq, kv, h // kv, d)
    scores = jnp.einsum("bqngd,bknd->bngqk", q, k, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, h, tq, tk)
  else:
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  scores = scores / jnp.sqrt(d).astype(jnp.float32)
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  # jax.nn.softmax's shift: the row max, outside the gradient (softmax does not depend on it).
  unnormalised = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, -1, keepdims=True)))
  denominator = jnp.sum(unnormalised, axis=-1, keepdims=True)  # [b, h, q, 1], >= 1
  unnormalised = unnormalised.astype(dtype)
  if kv != h:
    out = jnp.einsum("bngqk,bknd->bngqd", unnormalised.reshape(b, kv, h // kv, tq, tk), v,
                     preferred_element_type=jnp.float32).reshape(b, h, tq, d)
  else:
    out = jnp.einsum("bhqk,bkhd->bhqd", unnormalised, v, preferred_element_type=jnp.float32)
  return jnp.transpose(out / denominator, (0, 2, 1, 3)).astype(dtype)


def decode_attention(module: nn.Module, q, k, v, *, rope_base: float, rope_fraction: float,
                     dtype=jnp.float32, rope_layout: str = "interleaved",
                     window: Optional[int] = None):
  """The KV-cache step of an attention module in `decode` mode (shared by every attention).

  q: [b, T, h, d], k, v: [b, T, kv, d] projections of T new tokens, before RoPE (the cache
  holds the kv heads only). Declares `cached_key`,
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
  rope = dict(base=rope_base, fraction=rope_fraction, layout=rope_layout)
  q, k = apply_rope(q, positions, **rope), apply_rope(k, positions, **rope)
  keys = jax.lax.dynamic_update_slice(cached_key.value, k, (0, start, 0, 0))
  values = jax.lax.dynamic_update_slice(cached_value.value, v, (0, start, 0, 0))
  cached_key.value, cached_value.value = keys, values
  cache_index.value = start + t
  max_len = keys.shape[1]
  k_positions = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), (b, max_len))
  out = dot_product_attention(q, keys, values, causal_mask(positions, k_positions, window),
                              dtype)
  return out, positions


class MultiHeadAttention(nn.Module):
  """Self-attention; the defaults (no biases, kv heads = heads, no window) are adacomp's own."""
  num_heads: int
  head_dim: int
  rope_base: float = 10000.0
  rope_fraction: float = 1.0
  dtype: DTypeLike = jnp.float32
  param_dtype: DTypeLike = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  num_kv_heads: Optional[int] = None  # None: num_heads
  qkv_bias: bool = False
  out_bias: bool = False
  rope_layout: str = "interleaved"
  window: Optional[int] = None
  # Causal query blocks of at least this many rows skip the keys after them (causal_blocks,
  # dot_product_attention's `blocks`); 0 computes the whole square. Needs positions that
  # increase along the sequence, as every caller's do (arange, offset by a cache start).
  causal_block: int = CAUSAL_BLOCK

  @nn.compact
  def __call__(self, x, positions, *, decode: bool = False):
    """x: [b, t, d]; positions: [b, t] absolute positions (ignored in decode mode)."""
    b, t, d = x.shape
    h, hd = self.num_heads, self.head_dim
    kv = self.num_kv_heads or h
    if h % kv:
      raise ValueError(f"num_heads={h} is not a multiple of num_kv_heads={kv} "
                       f"(DecoderConfig.num_kv_heads); choose a divisor of num_heads.")

    def dense(name, shape, axes, init=self.kernel_init):
      return self.param(name, nn.with_logical_partitioning(init, axes),
                        shape, self.param_dtype).astype(self.dtype)

    def project(name, heads):
      y = jnp.einsum("btd,dhk->bthk", x, dense(name, (d, heads, hd), ("embed", "heads", "kv")))
      if self.qkv_bias:
        y = y + dense(name + "_bias", (heads, hd), ("heads", "kv"), nn.initializers.zeros)
      return y

    q, k, v = project("query", h), project("key", kv), project("value", kv)
    wo = dense("out", (h, hd, d), ("heads", "kv", "embed"))

    def output(out):
      y = jnp.einsum("bthk,hkd->btd", out, wo)
      if self.out_bias:
        y = y + dense("out_bias", (d,), ("embed",), nn.initializers.zeros)
      return y

    if decode:
      cached = decode_attention(self, q, k, v, rope_base=self.rope_base,
                                rope_fraction=self.rope_fraction, dtype=self.dtype,
                                rope_layout=self.rope_layout, window=self.window)
      if cached is not None:
        out, positions = cached
        self._sow_macs(b, t, d, positions)
        return output(out)

    rope = dict(base=self.rope_base, fraction=self.rope_fraction, layout=self.rope_layout)
    q, k = apply_rope(q, positions, **rope), apply_rope(k, positions, **rope)
    q = nn.with_logical_constraint(q, ("act_batch", "act_length", "act_heads", "act_kv"))
    k = nn.with_logical_constraint(k, ("act_batch", "act_length", "act_heads", "act_kv"))
    out = dot_product_attention(q, k, v, causal_mask(positions, positions, self.window),
                                self.dtype, blocks=causal_blocks(t, self.causal_block))
    self._sow_macs(b, t, d, positions)
    return output(out)

  def _sow_macs(self, b, t, d, positions):
    """Per-token MACs: q/k/v/out projections plus scores and weighted sum over visible keys."""
    visible_keys = positions + 1
    if self.window is not None:
      visible_keys = jnp.minimum(visible_keys, self.window)
    inner = self.num_heads * self.head_dim
    kv_inner = (self.num_kv_heads or self.num_heads) * self.head_dim
    macs = 2 * d * inner + 2 * d * kv_inner + 2 * inner * visible_keys.astype(jnp.float32)
    self.sow("intermediates", "macs", jnp.broadcast_to(macs, (b, t)))
