"""Root-mean-square layer normalisation (Zhang & Sennrich, 2019): y = x / rms(x) * scale."""
import flax.linen as nn
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
