"""Token embedding table; `attend` reuses it as the output projection for tied logits."""
import flax.linen as nn
import jax.numpy as jnp
from jax.typing import DTypeLike


class Embed(nn.Module):
  num_embeddings: int
  features: int
  dtype: DTypeLike = jnp.float32
  param_dtype: DTypeLike = jnp.float32
  embedding_init: nn.initializers.Initializer = nn.initializers.normal(stddev=1.0)

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(self.embedding_init, ("vocab", "embed")),
        (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, ids):
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x):
    """Logits x @ E^T, computed in the compute dtype and returned in float32."""
    return jnp.einsum("...d,vd->...v", x, self.embedding.astype(self.dtype),
                      preferred_element_type=jnp.float32)
