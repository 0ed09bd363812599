"""Low-rank adapter on a frozen matrix: x W + (x A) B (Hu et al., 2021, arXiv 2106.09685).

Informed routing's optional last stage (arXiv 2510.13831) fine-tunes the frozen base with LoRA
after the routers. For a frozen weight W: [d_in, d_out], the adapted map is

    x -> x W + (x A) B,        A: [d_in, r],  B: [r, d_out],

with r the rank (a gin parameter of the routed unit). Choices made here:
  * A starts LeCun-normal and B at zero, so the adapted map starts as x W exactly: the stage
    begins at the previous stage's function, and gradients reach B at once.
  * No alpha / r scale (it only rescales the learning rate of B under Adam).
  * The adapter is not merged into W: it costs r (d_in + d_out) MACs per token (`macs`);
    merging W + A B after training would remove that cost.
"""
import flax.linen as nn
import jax.numpy as jnp
from jax.typing import DTypeLike


class LoRA(nn.Module):
  """(x A) B, the low-rank update of a [d_in, features] matrix (add it to x W).

  Attributes:
    rank: r.
    features: d_out, the adapted matrix's output width.
  """
  rank: int
  features: int
  dtype: DTypeLike = jnp.float32
  param_dtype: DTypeLike = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: [..., d_in] -> [..., features]."""
    if self.rank < 1:
      raise ValueError(f"LoRA.rank={self.rank}; use a positive rank (routed_ffn.lora_rank).")
    a = self.param("a", nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                     (None, None)),
                   (x.shape[-1], self.rank), self.param_dtype)
    b = self.param("b", nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, None)),
                   (self.rank, self.features), self.param_dtype)
    h = jnp.einsum("...d,dr->...r", x.astype(self.dtype), a.astype(self.dtype))
    return jnp.einsum("...r,rf->...f", h, b.astype(self.dtype))

  def macs(self, d_in: int) -> int:
    return self.rank * (d_in + self.features)
