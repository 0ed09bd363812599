"""Pre-norm Transformer decoder block: x + Attn(Norm(x)), then x + FFN(Norm(x)).

The FFN is any module class taking (d_ff, activation, dtype, param_dtype): the dense FFN by
default, and the adaptive FFNs of the other methods plug in through the same slot. The attention
is any module class taking (num_heads, head_dim, rope_base, rope_fraction, dtype, param_dtype)
and called as attn(x, positions, decode=...): MultiHeadAttention by default (TokenFormer and
routed attention units plug in there). `norm` names the normalisation (layers.normalization).
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax.typing import DTypeLike

from layers.attention import MultiHeadAttention
from layers.mlp import DenseFFN
from layers.normalization import make_norm


class DecoderBlock(nn.Module):
  num_heads: int
  head_dim: int
  d_ff: int
  activation: str = "gelu"
  rope_base: float = 10000.0
  rope_fraction: float = 1.0
  ffn_cls: Any = DenseFFN
  attention_cls: Any = MultiHeadAttention
  norm: str = "rms"
  decode: bool = False
  dtype: DTypeLike = jnp.float32
  param_dtype: DTypeLike = jnp.float32

  @nn.compact
  def __call__(self, x, positions, active=None, routes=None, layer=None):
    """x: [b, t, d]; active: optional bool [b, t] or [t], False makes the block the identity
    for that token (its output is discarded; the computation still runs, as in training).
    routes: optional int [b, t] routing decisions imposed on the FFN (adaptive FFNs take a
    `routes` keyword; None lets the FFN decide). layer: this block's index (int or traced
    int32), passed to FFNs that declare `takes_layer` (seeded per-layer random routes);
    `positions` goes to FFNs that declare `takes_positions`."""
    x_in = x
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = make_norm(self.norm, name="attn_norm", **kw)(x)
    y = self.attention_cls(self.num_heads, self.head_dim, rope_base=self.rope_base,
                           rope_fraction=self.rope_fraction, name="attn", **kw)(
                               y, positions, decode=self.decode)
    x = x + y
    x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
    y = make_norm(self.norm, name="ffn_norm", **kw)(x)
    ffn = self.ffn_cls(d_ff=self.d_ff, activation=self.activation, name="ffn", **kw)
    ffn_kw = {} if routes is None else {"routes": routes}
    if layer is not None and getattr(ffn, "takes_layer", False):
      ffn_kw["layer"] = layer
    if getattr(ffn, "takes_positions", False):
      ffn_kw["positions"] = positions
    y = ffn(y, **ffn_kw)
    x = x + y
    if active is not None:
      x = jnp.where(jnp.broadcast_to(active, x.shape[:2])[..., None], x, x_in)
    return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
