"""The specification of pattention (TokenFormer, arXiv 2410.23168, eq. 5-6), in plain jnp.

    S = X K_P^T                                   [t, n]   scores against parameter keys
    A = GeLU(S_i * tau / sqrt(sum_j S_ij^2 + eps)) row by row (the paper's Theta)
    out = A V_P                                   [t, d_out]

tau defaults to sqrt(n) (the paper's choice); pass the old value when a model grows n so that
existing parameter tokens keep their scale. eps (1e-6) guards all-zero score rows, which the paper
leaves undefined (the released `l2_norm_gelu` has none: the two agree to ~eps / ||S_i||^2).
GeLU is the exact (erf) one, the released code's `F.gelu`; the TPU kernel computes it with
lax.erf, the Triton kernel with `_common.erfc_f32` (Triton lowers no erf). A is rounded to V_P's
dtype before the second matmul, as the kernels feed their matrix units; accumulation is f32.
"""
import math

import jax
import jax.numpy as jnp

from pallas_kernels import _common

EPS = 1e-6


def default_tau(n: int) -> float:
  return math.sqrt(n)


def normalised_scores(s: jax.Array, tau: float, eps: float = EPS) -> jax.Array:
  """Theta(S): GeLU of each row scaled to L2 norm tau. s f32 [t, n]."""
  scale = tau * jax.lax.rsqrt(jnp.sum(s * s, axis=-1, keepdims=True) + eps)
  return _common.gelu_exact(s * scale)


def pattention(x, k_p, v_p, *, tau: float, eps: float = EPS):
  """x [t, d_in], k_p [n, d_in], v_p [n, d_out] -> [t, d_out]."""
  s = jnp.dot(x, k_p.T, preferred_element_type=jnp.float32)
  a = normalised_scores(s, tau, eps).astype(v_p.dtype)
  return jnp.dot(a, v_p, preferred_element_type=jnp.float32).astype(x.dtype)
