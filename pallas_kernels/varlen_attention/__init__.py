"""varlen_attention: attention over a per-example number of kept tokens, skipping masked blocks.

    out[b, i] = softmax_{j < L_b (, j <= i)}(q[b, i] . k[b, j] * sm_scale) v[b, j]   for i < L_b
    out[b, i] = 0                                                                   for i >= L_b

q, k, v [b, t, h, d]; lengths int [b] = number of valid tokens, packed at the front (pruned ViT
tokens after a stable sort by keep flag, packed sequences). Non-causal unless causal=True.
sm_scale defaults to 1 / sqrt(d). Key blocks wholly past the length are skipped: their loop
bound (GPU) or grid steps (TPU) come from lengths, so compute scales with sum_b L_b^2, not b t^2.
Online softmax with f32 accumulators (flash attention). Lengths are clipped to [0, t].

Gradients: a custom VJP whose backward is the reference's VJP, recomputed in XLA (dense
masked attention in the backward pass). Blocks: see tpu.py and gpu.py.
"""
from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels import _common
from pallas_kernels import _dispatch
from pallas_kernels.varlen_attention import gpu
from pallas_kernels.varlen_attention import reference
from pallas_kernels.varlen_attention import tpu


def varlen_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *,
                     causal: bool = False, sm_scale: Optional[float] = None,
                     impl: Optional[str] = None, block_q: Optional[int] = None,
                     block_k: Optional[int] = None) -> jax.Array:
  """Attention of q over the first lengths[b] keys of each example: [b, t, h, d] -> same."""
  if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape or lengths.shape != q.shape[:1]:
    raise ValueError(f"varlen_attention: needs q, k, v [b, t, h, d] and lengths [b]; got "
                     f"{q.shape}, {k.shape}, {v.shape}, {lengths.shape}.")
  sm_scale = reference.default_scale(q.shape[-1]) if sm_scale is None else float(sm_scale)
  blocks = {k: v for k, v in dict(block_q=block_q, block_k=block_k).items() if v is not None}
  lengths = jnp.clip(jnp.asarray(lengths, jnp.int32), 0, q.shape[1])

  def ref(q, k, v, lengths):
    return reference.varlen_attention(q, k, v, lengths, causal=causal, sm_scale=sm_scale)

  def kernel(backend, interpret):
    return _common.with_reference_vjp(
        lambda *a: backend.varlen_attention(*a, causal=causal, sm_scale=sm_scale,
                                            interpret=interpret, **blocks),
        ref, diff_argnums=(0, 1, 2))

  return _dispatch.dispatch(
      impl, q, k.astype(q.dtype), v.astype(q.dtype), lengths, reference=ref,
      tpu=lambda *a, interpret: kernel(tpu, interpret)(*a),
      gpu=lambda *a, interpret: kernel(gpu, interpret)(*a))


__all__ = ["varlen_attention"]
