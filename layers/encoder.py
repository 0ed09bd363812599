"""Pre-norm Transformer encoder block (ViT / DeiT): x + MHSA(LN(x)), then x + MLP(LN(x)).

Bidirectional multi-head self-attention over a token set with an optional key mask m in [0, 1]:

    P_h[q, k] = m_k exp(z_h[q, k]) / sum_k' m_k' exp(z_h[q, k']),  z_h = q_h k_h^T / sqrt(d_head)

For a hard mask (m in {0, 1}) this is the usual masked softmax: a token with m_k = 0 gets no
attention and cannot influence any other token. For a straight-through mask (forward value
hard, gradient soft, as in token-pruning training) the multiplicative form lets the gradient
reach m, which `jnp.where`-masking would cut (DynamicViT's attention masking). The class token
(index 0) is expected to keep m = 1, so every row has at least one key.

Besides its output, the block returns what token pruning (layers/token_pruning.py) scores from:
the class token's attention probabilities P_h[0, :] [b, h, n] and the per-head attention-output
norms ||O_h[j]|| [b, h, n], O_h = P_h V_h, head h's output for token j before the output
projection (AS-ViT's released vit.py: `attn_out = attn @ v`, then the L2 norm over the head's
channels).

Per-token MACs are sown as `intermediates/macs` [b, n], counting only kept tokens (m_j > 0.5) and
only kept keys: m_j * (4 d H d_head + 2 H d_head * sum_k m_k + 2 d d_ff).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from layers.mlp import activation_fn
from layers.normalization import LayerNorm


class EncoderAttention(nn.Module):
  """Non-causal multi-head attention with a multiplicative key mask (see module docstring)."""
  num_heads: int
  head_dim: int
  dtype: DTypeLike = jnp.float32
  param_dtype: DTypeLike = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x, mask=None):
    """x: [b, n, d]; mask: optional float [b, n]. Returns (out [b, n, d], class-attention
    probabilities [b, h, n] float32, attention-output norms ||(P_h V_h)[j]|| [b, h, n]
    float32)."""
    d = x.shape[-1]
    h, hd = self.num_heads, self.head_dim

    def dense(name, shape, axes):
      return self.param(name, nn.with_logical_partitioning(self.kernel_init, axes),
                        shape, self.param_dtype).astype(self.dtype)

    def bias(name, shape, axes):
      return self.param(name, nn.with_logical_partitioning(nn.initializers.zeros, axes),
                        shape, self.param_dtype).astype(self.dtype)

    q = jnp.einsum("bnd,dhk->bnhk", x, dense("query", (d, h, hd), ("embed", "heads", "kv")))
    q = q + bias("query_bias", (h, hd), ("heads", "kv"))
    k = jnp.einsum("bnd,dhk->bnhk", x, dense("key", (d, h, hd), ("embed", "heads", "kv")))
    k = k + bias("key_bias", (h, hd), ("heads", "kv"))
    v = jnp.einsum("bnd,dhk->bnhk", x, dense("value", (d, h, hd), ("embed", "heads", "kv")))
    v = v + bias("value_bias", (h, hd), ("heads", "kv"))
    z = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    z = z / jnp.sqrt(jnp.float32(hd))
    z = z - jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    e = jnp.exp(z)
    if mask is not None:
      e = e * mask.astype(jnp.float32)[:, None, None, :]
    denominator = jnp.sum(e, axis=-1, keepdims=True)
    # Unnormalised through the value product, heads leading, then one division per query row
    # (layers.attention.dot_product_attention: the layout XLA's dot emitters run fast).
    heads_out = jnp.einsum("bhqk,bkhd->bhqd", e.astype(self.dtype), v,
                           preferred_element_type=jnp.float32) / denominator
    heads_out = jnp.transpose(heads_out, (0, 2, 1, 3)).astype(self.dtype)
    class_probs = e[:, :, 0, :] / denominator[:, :, 0, :]
    # AS-ViT weighs heads by the norm of this per-head output (before the projection mixes them).
    out_norms = jnp.linalg.norm(heads_out.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
    out = jnp.einsum("bqhk,hkd->bqd", heads_out,
                     dense("out", (h, hd, d), ("heads", "kv", "embed")))
    out = out + bias("out_bias", (d,), ("embed",))
    return out, class_probs, out_norms


def encoder_block_macs(d_model: int, num_heads: int, head_dim: int, d_ff: int, mask):
  """Per-token MACs [b, n] of one encoder block for keep mask `mask` [b, n] (see module doc)."""
  kept = (mask > 0.5).astype(jnp.float32)
  inner = num_heads * head_dim
  keys = jnp.sum(kept, axis=-1, keepdims=True)
  return kept * (4 * d_model * inner + 2 * inner * keys + 2 * d_model * d_ff)


class EncoderBlock(nn.Module):
  """x + Attn(LN(x)), x + MLP(LN(x)); LayerNorm with scale and bias, as in ViT and DeiT."""
  num_heads: int
  head_dim: int
  d_ff: int
  activation: str = "gelu"
  dtype: DTypeLike = jnp.float32
  param_dtype: DTypeLike = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  norm_epsilon: float = 1e-6  # Hugging Face's ViT/DeiT use 1e-12

  @nn.compact
  def __call__(self, x, mask=None):
    """x: [b, n, d]; mask: optional float keep mask [b, n] (None: every token). Returns
    (x, class-attention probabilities [b, h, n], attention-output norms [b, h, n])."""
    b, n, d = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm_kw = dict(kw, epsilon=self.norm_epsilon)
    y = LayerNorm(use_scale=True, use_bias=True, name="attn_norm", **norm_kw)(x)
    y, cls_attn, out_norms = EncoderAttention(self.num_heads, self.head_dim, name="attn",
                                                kernel_init=self.kernel_init, **kw)(y, mask)
    x = x + y
    y = LayerNorm(use_scale=True, use_bias=True, name="mlp_norm", **norm_kw)(x)
    w_in = self.param("wi", nn.with_logical_partitioning(self.kernel_init, ("embed", "mlp")),
                      (d, self.d_ff), self.param_dtype)
    w_out = self.param("wo", nn.with_logical_partitioning(self.kernel_init, ("mlp", "embed")),
                       (self.d_ff, d), self.param_dtype)
    b_in = self.param("bi", nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
                      (self.d_ff,), self.param_dtype)
    b_out = self.param("bo", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                       (d,), self.param_dtype)
    y = activation_fn(self.activation)(y @ w_in.astype(self.dtype) + b_in.astype(self.dtype))
    y = nn.with_logical_constraint(y, ("act_batch", "act_length", "act_mlp"))
    y = y @ w_out.astype(self.dtype) + b_out.astype(self.dtype)
    x = x + y
    keep = jnp.ones((b, n), jnp.float32) if mask is None else mask
    self.sow("intermediates", "macs",
             encoder_block_macs(d, self.num_heads, self.head_dim, self.d_ff, keep))
    return x, cls_attn, out_norms
