"""Lightweight Feature Forecaster (LFF): a unit's residual update, predicted on the cheap.

Informed routing ("execute or approximate", arXiv 2510.13831) replaces a unit (an FFN or an
attention block) for the tokens it does not execute by a forecast of that unit's output. The
forecaster is a two-layer linear network of low rank r, with no nonlinearity (none is reported):

    u_hat(x) = (x A) B,        A: [d, r],  B: [r, d],

where x is the unit's input (the normed hidden state the block feeds the unit) and u_hat
predicts the unit's output u(x), the residual update the block adds. Its cost is 2 d r
multiply-accumulates per token against 2 d d_ff for the FFN (r = d / 8 by default: 1/32 of the
tiny model's FFN).

Choices the paper leaves open, made here:
  * A starts LeCun-normal, B at zero (as LoRA does), so an untrained forecaster predicts 0:
    the greedy execute-or-skip baseline's identity, the safest prior, and gradients still reach
    B at once.
  * Distillation loss (sown by the routed units, see layers/routing.py): the squared error to
    the frozen unit's output, averaged over tokens and features,
        L_distill = w * mean_{tokens, features} (stop_gradient(u(x)) - u_hat(x))^2.
  * Parameters are float32 and the forecast runs in the block's compute dtype.
"""
import flax.linen as nn
import jax.numpy as jnp
from jax.typing import DTypeLike


def forecaster_macs(d_model: int, rank: int) -> int:
  """Multiply-accumulates of one token's forecast: x A, then (x A) B."""
  return 2 * d_model * rank


def distillation_loss(target, forecast) -> jnp.ndarray:
  """mean (stop_gradient(target) - forecast)^2 over every token and feature, in float32.

  The caller passes `target` already stop-gradiented when the unit must stay frozen.
  """
  diff = target.astype(jnp.float32) - forecast.astype(jnp.float32)
  return jnp.mean(jnp.square(diff))


class FeatureForecaster(nn.Module):
  """u_hat(x) = (x A) B, a rank-`rank` linear map d -> d (see the module docstring).

  Attributes:
    rank: r, the width of the bottleneck.
  """
  rank: int
  dtype: DTypeLike = jnp.float32
  param_dtype: DTypeLike = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: [..., d] -> [..., d]."""
    if self.rank < 1:
      raise ValueError(f"FeatureForecaster.rank={self.rank}; use a positive rank "
                       f"(routing_unit.forecaster_rank).")
    d = x.shape[-1]
    down = self.param("down", nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("embed", None)), (d, self.rank), self.param_dtype)
    up = self.param("up", nn.with_logical_partitioning(
        nn.initializers.zeros_init(), (None, "embed")), (self.rank, d), self.param_dtype)
    h = jnp.einsum("...d,dr->...r", x.astype(self.dtype), down.astype(self.dtype))
    return jnp.einsum("...r,rd->...d", h, up.astype(self.dtype))

  def macs(self, d_model: int) -> int:
    return forecaster_macs(d_model, self.rank)
