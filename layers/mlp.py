"""Position-wise feed-forward network: y = W_out act(W_in x) (Vaswani et al., 2017).

Gated (GLU) variant (Shazeer, 2020): y = W_out (act(W_gate x) * W_in x), SwiGLU with 'silu'
(Llama, Qwen2, Mistral), GeGLU with 'gelu'/'gelu_tanh'. Optional biases on both projections
(GPT-2, OPT).
"""
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
  gated: bool = False
  use_bias: bool = False

  @nn.compact
  def __call__(self, x, *, deterministic: bool = True):
    del deterministic
    d_model = x.shape[-1]

    def param(name, shape, axes, init=self.kernel_init):
      return self.param(name, nn.with_logical_partitioning(init, axes), shape,
                        self.param_dtype).astype(self.dtype)

    def project_in(suffix):
      h = jnp.einsum("...d,df->...f", x, param("wi" + suffix, (d_model, self.d_ff),
                                                ("embed", "mlp")))
      if self.use_bias:
        h = h + param("bi" + suffix, (self.d_ff,), ("mlp",), nn.initializers.zeros)
      return h

    if not (self.gated or self.use_bias):
      w_in = param("wi", (d_model, self.d_ff), ("embed", "mlp"))
      y = feed_forward(x, w_in, param("wo", (self.d_ff, d_model), ("mlp", "embed")),
                       self.activation)
    else:
      h = activation_fn(self.activation)(project_in("_gate" if self.gated else ""))
      if self.gated:
        h = h * project_in("")
      w_out = param("wo", (self.d_ff, d_model), ("mlp", "embed"))
      h = nn.with_logical_constraint(h, ("act_batch", "act_length", "act_mlp"))
      y = jnp.einsum("...f,fd->...d", h, w_out)
      if self.use_bias:
        y = y + param("bo", (d_model,), ("embed",), nn.initializers.zeros)
    macs = ffn_macs(d_model, self.d_ff) * (1.5 if self.gated else 1)
    self.sow("intermediates", "macs", jnp.full(x.shape[:-1], macs, jnp.float32))
    return y
