"""Normalisation layers.

RMSNorm (Zhang & Sennrich, 2019): y = x / rms(x) * scale, the default of every model.
LayerNorm (Ba et al., 2016): y = (x - mean(x)) / std(x) [* scale + bias]; TokenFormer's blocks use
the non-parametric form (no scale, no bias).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike


class RMSNorm(nn.Module):
  """RMSNorm over the last axis; statistics in float32 whatever the compute dtype."""
  epsilon: float = 1e-6
  dtype: DTypeLike = jnp.float32
  param_dtype: DTypeLike = jnp.float32
  use_scale: bool = True

  @nn.compact
  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon))
    if self.use_scale:
      scale = self.param(
          "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
          (x.shape[-1],), self.param_dtype)
      y = y * scale.astype(jnp.float32)
    return y.astype(self.dtype)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis in float32; `use_scale` / `use_bias` False: non-parametric."""
  epsilon: float = 1e-6
  dtype: DTypeLike = jnp.float32
  param_dtype: DTypeLike = jnp.float32
  use_scale: bool = False
  use_bias: bool = False

  @nn.compact
  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.epsilon)
    if self.use_scale:
      y = y * self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                         (x.shape[-1],), self.param_dtype).astype(jnp.float32)
    if self.use_bias:
      y = y + self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                         (x.shape[-1],), self.param_dtype).astype(jnp.float32)
    return y.astype(self.dtype)


NORMS = ("rms", "layernorm", "layernorm_affine")


def make_norm(kind: str, **kwargs) -> nn.Module:
  """'rms': RMSNorm with a scale; 'layernorm': non-parametric LayerNorm (TokenFormer's blocks);
  'layernorm_affine': LayerNorm with scale and bias (the released TokenFormer's final norm)."""
  if kind == "rms":
    return RMSNorm(**kwargs)
  if kind == "layernorm":
    return LayerNorm(**kwargs)
  if kind == "layernorm_affine":
    return LayerNorm(use_scale=True, use_bias=True, **kwargs)
  raise ValueError(f"Unknown norm {kind!r}; use one of {NORMS} (DecoderConfig.norm).")
