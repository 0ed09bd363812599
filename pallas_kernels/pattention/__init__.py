"""pattention: TokenFormer's token-parameter attention (arXiv 2410.23168), fused.

    out = Theta(X K_P^T) V_P,   Theta(S)_i = GeLU(S_i * tau / ||S_i||_2)

X [..., d_in] (leading dims are flattened into tokens), K_P [n, d_in], V_P [n, d_out]. The L2
norm runs over all n scores of a row, so the kernels make two passes over parameter-token blocks
(norms, then normalise + GeLU + accumulate against V_P) and never write the [tokens, n] score
matrix to HBM. tau defaults to sqrt(n); when a model grows n, pass the old tau. See reference.py
for eps and the GeLU form, tpu.py / gpu.py for blocks.

Gradients: a custom VJP whose backward is the reference's VJP, recomputed in XLA (it does
materialise the scores, in the backward pass only).
"""
from typing import Optional

import jax

from pallas_kernels import _common
from pallas_kernels import _dispatch
from pallas_kernels.pattention import gpu
from pallas_kernels.pattention import reference
from pallas_kernels.pattention import tpu


def pattention(x: jax.Array, k_p: jax.Array, v_p: jax.Array, *, tau: Optional[float] = None,
               eps: float = reference.EPS, impl: Optional[str] = None,
               block_t: Optional[int] = None, block_n: Optional[int] = None,
               block_d: Optional[int] = None, block_out: Optional[int] = None) -> jax.Array:
  """Theta(x K_P^T) V_P: x [..., d_in], k_p [n, d_in], v_p [n, d_out] -> [..., d_out]."""
  n, d_in = k_p.shape
  if x.shape[-1] != d_in or v_p.ndim != 2 or v_p.shape[0] != n:
    raise ValueError(f"pattention: needs x [..., d_in], k_p [n, d_in], v_p [n, d_out]; got "
                     f"{x.shape}, {k_p.shape}, {v_p.shape}.")
  tau = reference.default_tau(n) if tau is None else float(tau)
  lead = x.shape[:-1]
  x2 = x.reshape(-1, d_in)
  k_p, v_p = k_p.astype(x.dtype), v_p.astype(x.dtype)
  tpu_blocks = {k: v for k, v in dict(block_t=block_t, block_n=block_n).items() if v is not None}
  gpu_blocks = {k: v for k, v in dict(block_t=block_t, block_n=block_n, block_d=block_d,
                                      block_out=block_out).items() if v is not None}

  def ref(x, k, v):
    return reference.pattention(x, k, v, tau=tau, eps=eps)

  def kernel(backend, blocks, interpret):
    return _common.with_reference_vjp(
        lambda *a: backend.pattention(*a, tau=tau, eps=eps, interpret=interpret, **blocks),
        ref, diff_argnums=(0, 1, 2))

  out = _dispatch.dispatch(
      impl, x2, k_p, v_p, reference=ref,
      tpu=lambda *a, interpret: kernel(tpu, tpu_blocks, interpret)(*a),
      gpu=lambda *a, interpret: kernel(gpu, gpu_blocks, interpret)(*a))
  return out.reshape(*lead, v_p.shape[1])


__all__ = ["pattention"]
