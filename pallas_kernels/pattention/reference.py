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


# The two halves the op runs when the parameter tokens are split over a mesh axis: each shard's
# row_norms, summed over the shards (a psum), feed each shard's attend, whose outputs are summed.
# attend(x, k, v, row_norms(x, k)) == pattention(x, k, v).


def row_norms(x, k_p):
  """sum_j S_ij^2, f32 [t]: the squared L2 norms of the score rows over these keys."""
  s = jnp.dot(x, k_p.T, preferred_element_type=jnp.float32)
  return jnp.sum(s * s, axis=-1)


def attend(x, k_p, v_p, sq_norms, *, tau: float, eps: float = EPS, out_dtype=None):
  """GeLU(S_i tau / sqrt(sq_norms_i + eps)) V_P with the norms given (of all n keys), in
  out_dtype (None: x.dtype; f32 for partial sums over a split of the keys)."""
  s = jnp.dot(x, k_p.T, preferred_element_type=jnp.float32)
  a = _common.gelu_exact(s * (tau * jax.lax.rsqrt(sq_norms + eps))[:, None]).astype(v_p.dtype)
  return jnp.dot(a, v_p, preferred_element_type=jnp.float32).astype(out_dtype or x.dtype)
