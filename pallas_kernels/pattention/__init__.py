"""pattention: TokenFormer's token-parameter attention (arXiv 2410.23168), fused.

    out = Theta(X K_P^T) V_P,   Theta(S)_i = GeLU(S_i * tau / ||S_i||_2)

X [..., d_in] (leading dims are flattened into tokens), K_P [n, d_in], V_P [n, d_out]. The L2
norm runs over all n scores of a row, so the kernels make two passes over parameter-token blocks
(norms, then normalise + GeLU + accumulate against V_P) and never write the [tokens, n] score
matrix to HBM. tau defaults to sqrt(n); when a model grows n, pass the old tau. See reference.py
for eps and the GeLU form, tpu.py / gpu.py for blocks.

Under a device mesh (`jax.set_mesh`; pallas_kernels/_partition.py) the op runs per shard: tokens
split over the batch axes (data, fsdp), K_P and V_P as TokenFormer's layers hold them, their n
parameter tokens split over `tensor` (gathered over fsdp). A split of n splits the row norm, so
each shard computes its keys' sums of squares (`row_norms`), a psum over `tensor` completes
||S_i||^2 over all n, each shard attends over its keys with the full norm (`attend`, f32
partials) and a second psum sums the partials: the result equals the unsplit op (to rounding).
Without a tensor split the fused kernel runs per shard.

Gradients: custom VJPs whose backward is the reference's VJP, recomputed in XLA: it materialises
the [t, n] scores in the backward pass only. Why not a kernel: Theta's Jacobian couples every
score of a row through the norm (dS = tau/||S|| (dA' - S (S . dA') / ||S||^2), dA' = GeLU'
* (dOut V_P^T)), so a fused backward needs the two-pass structure again plus a row reduction of
S . dA'; it is not written (XLA's dots run on the MXU / tensor cores; the cost is HBM traffic of
the [t, n] f32 scores, per shard: t / shards x n / tensor).
"""
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels import _common
from pallas_kernels import _dispatch
from pallas_kernels import _partition
from pallas_kernels._partition import P
from pallas_kernels.pattention import gpu
from pallas_kernels.pattention import reference
from pallas_kernels.pattention import tpu


def _fused(impl, tau, eps, tpu_blocks, gpu_blocks):
  def ref(x, k, v):
    return reference.pattention(x, k, v, tau=tau, eps=eps)

  def kernel(backend, blocks, interpret):
    return _common.with_reference_vjp(
        lambda *a: backend.pattention(*a, tau=tau, eps=eps, interpret=interpret, **blocks),
        ref, diff_argnums=(0, 1, 2))

  return lambda *args: _dispatch.dispatch(
      impl, *_common.match_varying(*args), reference=ref,
      tpu=lambda *a, interpret: kernel(tpu, tpu_blocks, interpret)(*a),
      gpu=lambda *a, interpret: kernel(gpu, gpu_blocks, interpret)(*a))


def _split_n(impl, tau, eps, tpu_blocks, gpu_blocks, axis):
  """The op over this shard's keys, norms and outputs summed over `axis` (see docstring)."""
  norm_blocks = lambda b: {k: v for k, v in b.items() if k != "block_out"}
  attend_ref = functools.partial(reference.attend, tau=tau, eps=eps, out_dtype=jnp.float32)

  def norms(x, k):
    kernel = lambda backend, blocks, interpret: _common.with_reference_vjp(
        lambda *a: backend.row_norms(*a, interpret=interpret, **norm_blocks(blocks)),
        reference.row_norms, diff_argnums=(0, 1))
    return _dispatch.dispatch(
        impl, *_common.match_varying(x, k), reference=reference.row_norms,
        tpu=lambda *a, interpret: kernel(tpu, tpu_blocks, interpret)(*a),
        gpu=lambda *a, interpret: kernel(gpu, gpu_blocks, interpret)(*a))

  def attend(x, k, v, ss):
    kernel = lambda backend, blocks, interpret: _common.with_reference_vjp(
        lambda *a: backend.attend(*a, tau=tau, eps=eps, out_dtype=jnp.float32,
                                  interpret=interpret, **blocks),
        attend_ref, diff_argnums=(0, 1, 2, 3))
    return _dispatch.dispatch(
        impl, *_common.match_varying(x, k, v, ss), reference=attend_ref,
        tpu=lambda *a, interpret: kernel(tpu, tpu_blocks, interpret)(*a),
        gpu=lambda *a, interpret: kernel(gpu, gpu_blocks, interpret)(*a))

  def op(x, k, v):
    ss = jax.lax.psum(norms(x, k), axis)
    return jax.lax.psum(attend(x, k, v, ss), axis).astype(x.dtype)
  return op


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
  impl = _dispatch.resolve(impl)
  tpu_blocks = {k: v for k, v in dict(block_t=block_t, block_n=block_n).items() if v is not None}
  gpu_blocks = {k: v for k, v in dict(block_t=block_t, block_n=block_n, block_d=block_d,
                                      block_out=block_out).items() if v is not None}
  split = None if impl == "xla" else _partition.split_for((x2.shape[0],), tensor_dim=n)
  if split is None:
    out = _fused(impl, tau, eps, tpu_blocks, gpu_blocks)(x2, k_p, v_p)
  else:
    body = (_fused(impl, tau, eps, tpu_blocks, gpu_blocks) if split.tensor is None else
            _split_n(impl, tau, eps, tpu_blocks, gpu_blocks, split.tensor))
    rows = split.row_spec
    out = _partition.shard(body, split, in_specs=(P(rows, None), P(split.tensor, None),
                                                  P(split.tensor, None)),
                           out_specs=P(rows, None))(x2, k_p, v_p)
  return out.reshape(*lead, v_p.shape[1])


__all__ = ["pattention"]
