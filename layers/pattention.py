"""TokenFormer's token-parameter attention (Pattention) and the layers built from it.

TokenFormer (Wang et al., "TokenFormer: Rethinking Transformer Scaling with Tokenized Model
Parameters", arXiv 2410.23168) replaces every linear projection by attention from the input
tokens (queries) to n learnable parameter tokens (keys K_P [n, d_in], values V_P [n, d_out]):

    Pattention(X) = Theta(X K_P^T) V_P,   Theta(S)_i = GeLU(S_i * tau / ||S_i||_2)      (eq. 5-6)

i.e. each row of scores is scaled to L2 norm tau, then GeLU (the released code's
'l2_norm_gelu' normalisation). `pallas_kernels.pattention` computes it (fused kernels on TPU/GPU,
the jnp reference on CPU; its reference.py is the exact specification: tau * rsqrt(sum S_ij^2 +
1e-6), then the exact (erf) GeLU, the released code's F.gelu, in every implementation).

tau: the paper's code uses tau = sqrt(n). Growing n by appending tokens must keep tau at the old
value or every existing token's normalised score changes (by sqrt(n_new / n_old)), so tau is an
explicit attribute: `tau_tokens` is the n whose square root is tau, None = the current n.

Initialisation (the code's, checked in Haiyang-W/TokenFormer megatron/model/tokenformer.py: keys
use the model's `init_method`, values its `output_layer_init_method`, for every Pattention):
keys N(0, key_std = 0.02); values N(0, value_std), value_std = 2 / (num_layers * sqrt(d_model))
(GPT-NeoX's 'wang_init'), set by the gin factories in adacomp/methods/tokenformer/factories.py. Theta makes
the forward pass independent of the keys' scale (each score row is renormalised), so key_std only
sets how fast Adam moves the keys relative to their size.

Layers here (filling DecoderBlock's slots, DecoderConfig.attention_cls / ffn_cls):
  * `Pattention`: one token-parameter attention; params `key` [n, d_in], `value` [n, d_out].
  * `PattentionAttention`: query, key, value and out projections are Pattentions (n_qkv, n_qkv,
    n_qkv, n_out tokens); token-token attention stays softmax with partial RoPE and the same KV
    cache decode mode as `layers.attention.MultiHeadAttention`.
  * `PattentionFFN`: the whole FFN is one Pattention d -> d with n_ffn tokens (no hidden layer).

Under a device mesh the op partitions itself (pallas_kernels/_partition.py): tokens over the
batch axes, the n parameter tokens over `tensor` as `key` / `value` are held here
(('mlp', 'embed')), with the psum of the squared score norms Theta needs.

Compute: each Pattention sows `macs` = n * (d_in + d_out) per token (scores plus weighted sum; the
normalisation's O(n) is not counted, as biases and norms are not counted elsewhere);
PattentionAttention adds 2 * h * d_head * (visible keys) for the token-token attention.
"""
import math
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
from jax.typing import DTypeLike

import pallas_kernels
from layers.attention import (CAUSAL_BLOCK, causal_blocks, causal_mask, decode_attention,
                              dot_product_attention)
from layers.rope import apply_rope

DEFAULT_KEY_STD = 0.02


def tau_for(num_tokens: int, tau_tokens: Optional[int] = None) -> float:
  """tau = sqrt(tau_tokens), tau_tokens defaulting to the current number of tokens."""
  return math.sqrt(num_tokens if tau_tokens is None else tau_tokens)


class Pattention(nn.Module):
  """Theta(x K_P^T) V_P over the last axis of x; see the module docstring."""
  num_tokens: int
  features: int
  tau_tokens: Optional[int] = None
  key_std: float = DEFAULT_KEY_STD
  value_std: float = DEFAULT_KEY_STD
  impl: Optional[str] = None
  dtype: DTypeLike = jnp.float32
  param_dtype: DTypeLike = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: [..., d_in] -> [..., features]."""
    d_in = x.shape[-1]
    k_p = self.param("key", nn.with_logical_partitioning(
        nn.initializers.normal(self.key_std), ("mlp", "embed")),
                     (self.num_tokens, d_in), self.param_dtype)
    v_p = self.param("value", nn.with_logical_partitioning(
        nn.initializers.normal(self.value_std), ("mlp", "embed")),
                     (self.num_tokens, self.features), self.param_dtype)
    y = pallas_kernels.pattention(x.astype(self.dtype), k_p.astype(self.dtype),
                                  v_p.astype(self.dtype),
                                  tau=tau_for(self.num_tokens, self.tau_tokens), impl=self.impl)
    self.sow("intermediates", "macs", jnp.full(
        x.shape[:-1], self.num_tokens * (d_in + self.features), jnp.float32))
    return y


class PattentionAttention(nn.Module):
  """Causal multi-head attention whose q/k/v/out projections are Pattentions.

  Called like MultiHeadAttention: attn(x, positions, decode=...). `tau_tokens_qkv` /
  `tau_tokens_out` fix tau after growth (None: sqrt of the current counts).
  """
  num_heads: int
  head_dim: int
  n_qkv: int = 128
  n_out: int = 128
  tau_tokens_qkv: Optional[int] = None
  tau_tokens_out: Optional[int] = None
  rope_base: float = 10000.0
  rope_fraction: float = 1.0
  key_std: float = DEFAULT_KEY_STD
  value_std: float = DEFAULT_KEY_STD
  impl: Optional[str] = None
  dtype: DTypeLike = jnp.float32
  param_dtype: DTypeLike = jnp.float32
  causal_block: int = CAUSAL_BLOCK  # as MultiHeadAttention's (layers.attention.causal_blocks)

  def _pattention(self, name, n, tau_tokens, features):
    return Pattention(n, features, tau_tokens=tau_tokens, key_std=self.key_std,
                      value_std=self.value_std, impl=self.impl, dtype=self.dtype,
                      param_dtype=self.param_dtype, name=name)

  @nn.compact
  def __call__(self, x, positions, *, decode: bool = False):
    """x: [b, t, d]; positions: [b, t] absolute positions (ignored in decode mode)."""
    b, t, d = x.shape
    h, hd = self.num_heads, self.head_dim
    inner = h * hd
    q, k, v = (self._pattention(name, self.n_qkv, self.tau_tokens_qkv, inner)(x).reshape(
        b, t, h, hd) for name in ("query", "key", "value"))
    out_proj = self._pattention("out", self.n_out, self.tau_tokens_out, d)
    rope = dict(base=self.rope_base, fraction=self.rope_fraction)

    if decode:
      cached = decode_attention(self, q, k, v, rope_base=self.rope_base,
                                rope_fraction=self.rope_fraction, dtype=self.dtype)
      if cached is not None:
        out, positions = cached
        self._sow_macs(b, t, positions + 1)
        return out_proj(out.reshape(b, t, inner))

    q, k = apply_rope(q, positions, **rope), apply_rope(k, positions, **rope)
    q = nn.with_logical_constraint(q, ("act_batch", "act_length", "act_heads", "act_kv"))
    k = nn.with_logical_constraint(k, ("act_batch", "act_length", "act_heads", "act_kv"))
    out = dot_product_attention(q, k, v, causal_mask(positions, positions), self.dtype,
                                blocks=causal_blocks(t, self.causal_block))
    self._sow_macs(b, t, positions + 1)
    return out_proj(out.reshape(b, t, inner))

  def _sow_macs(self, b, t, visible_keys):
    """Token-token attention only (scores and weighted sum); the Pattentions sow their own."""
    macs = 2 * self.num_heads * self.head_dim * visible_keys.astype(jnp.float32)
    self.sow("intermediates", "macs", jnp.broadcast_to(macs, (b, t)))


class PattentionFFN(nn.Module):
  """The FFN slot filled by one Pattention d -> d with n_ffn parameter tokens.

  `d_ff` and `activation` are accepted for the slot's signature and ignored: the width is
  n_ffn and Theta's GeLU is the nonlinearity.
  """
  d_ff: Optional[int] = None
  activation: str = "gelu"
  n_ffn: int = 512
  tau_tokens: Optional[int] = None
  key_std: float = DEFAULT_KEY_STD
  value_std: float = DEFAULT_KEY_STD
  impl: Optional[str] = None
  dtype: DTypeLike = jnp.float32
  param_dtype: DTypeLike = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic: bool = True):
    del deterministic
    return Pattention(self.n_ffn, x.shape[-1], tau_tokens=self.tau_tokens,
                      key_std=self.key_std, value_std=self.value_std, impl=self.impl,
                      dtype=self.dtype, param_dtype=self.param_dtype, name="pattention")(x)
