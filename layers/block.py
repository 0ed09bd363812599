"""Pre-norm Transformer decoder block: x + Attn(Norm(x)), then x + FFN(Norm(x)).

The FFN is any module class taking (d_ff, activation, dtype, param_dtype): the dense FFN by
default, and the adaptive FFNs of the other methods plug in through the same slot. The attention
is any module class taking (num_heads, head_dim, rope_base, rope_fraction, dtype, param_dtype)
and called as attn(x, positions, decode=...): MultiHeadAttention by default (TokenFormer and
routed attention units plug in there). `norm` names the normalisation (layers.normalization).

The pretrained families' options (grouped-query attention, projection biases, RoPE layout,
sliding window, gated FFN) reach the attention and FFN classes only when set, so a class that
lacks one is refused by name instead of silently computing another function.
"""
import dataclasses
from typing import Any, Optional

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
  norm_epsilon: float = 1e-6
  num_kv_heads: Optional[int] = None
  qkv_bias: bool = False
  out_bias: bool = False
  rope_layout: str = "interleaved"
  window: Optional[int] = None
  ffn_gated: bool = False
  mlp_bias: bool = False
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
    norm_kw = dict(kw, epsilon=self.norm_epsilon)
    y = make_norm(self.norm, name="attn_norm", **norm_kw)(x)
    attn_options = _options(self.attention_cls, "attention_cls", dict(
        num_kv_heads=(self.num_kv_heads, None), qkv_bias=(self.qkv_bias, False),
        out_bias=(self.out_bias, False), rope_layout=(self.rope_layout, "interleaved"),
        window=(self.window, None)))
    y = self.attention_cls(self.num_heads, self.head_dim, rope_base=self.rope_base,
                           rope_fraction=self.rope_fraction, name="attn", **kw,
                           **attn_options)(y, positions, decode=self.decode)
    x = x + y
    x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
    y = make_norm(self.norm, name="ffn_norm", **norm_kw)(x)
    ffn_options = _options(self.ffn_cls, "ffn_cls", dict(
        gated=(self.ffn_gated, False), use_bias=(self.mlp_bias, False)))
    ffn = self.ffn_cls(d_ff=self.d_ff, activation=self.activation, name="ffn", **kw,
                       **ffn_options)
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


_OPTION_NAMES = {"num_kv_heads": "num_kv_heads", "qkv_bias": "attention_bias",
                 "out_bias": "attention_out_bias", "rope_layout": "rope_layout",
                 "window": "attention_window", "gated": "ffn_gated", "use_bias": "mlp_bias"}


def _options(cls, slot: str, values: dict) -> dict:
  """The options set away from their defaults, checked to be fields of `cls`."""
  target = getattr(cls, "func", cls)
  fields = {f.name for f in dataclasses.fields(target)} if dataclasses.is_dataclass(target) else ()
  chosen = {}
  for name, (value, default) in values.items():
    if value == default:
      continue
    if name not in fields:
      raise ValueError(
          f"DecoderConfig.{_OPTION_NAMES[name]}={value!r} is not supported by "
          f"{slot}={getattr(target, '__name__', target)}; use the dense backbone's class "
          f"(MultiHeadAttention / DenseFFN) or leave the option at its default {default!r}.")
    chosen[name] = value
  return chosen
