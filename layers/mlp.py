"""Position-wise feed-forward network: y = W_out act(W_in x) (Vaswani et al., 2017)."""
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def activation_fn(name: str) -> Callable:
  if name not in _ACTIVATIONS:
    raise ValueError(f"Unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}.")
  return _ACTIVATIONS[name]


def ffn_macs(d_model: int, d_ff: int) -> int:
  """Multiply-accumulates one token spends in an FFN of hidden width d_ff."""
  return 2 * d_model * d_ff


def feed_forward(x, w_in, w_out, activation: str):
  """W_out act(W_in x), the hidden activations constrained to the `act_mlp` axis."""
  h = activation_fn(activation)(jnp.einsum("...d,df->...f", x, w_in))
  h = nn.with_logical_constraint(h, ("act_batch", "act_length", "act_mlp"))
  return jnp.einsum("...f,fd->...d", h, w_out)


class DenseFFN(nn.Module):
  """Dense FFN; sows `macs` (per token) so evaluation can report compute like adaptive layers."""
  d_ff: int
  activation: str = "gelu"
  dtype: DTypeLike = jnp.float32
  param_dtype: DTypeLike = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x, *, deterministic: bool = True):
    del deterministic
    d_model = x.shape[-1]
    w_in = self.param("wi", nn.with_logical_partitioning(self.kernel_init, ("embed", "mlp")),
                      (d_model, self.d_ff), self.param_dtype)
    w_out = self.param("wo", nn.with_logical_partitioning(self.kernel_init, ("mlp", "embed")),
                       (self.d_ff, d_model), self.param_dtype)
    y = feed_forward(x, w_in.astype(self.dtype), w_out.astype(self.dtype), self.activation)
    self.sow("intermediates", "macs",
             jnp.full(x.shape[:-1], ffn_macs(d_model, self.d_ff), jnp.float32))
    return y
