"""gather_matmul and scatter: the token-routing primitives of top-k execute-or-skip.

    gather_matmul(x [m, d], idx [k], w [d, n]) = x[idx] @ w                       [k, n]
    scatter(y [k, n], idx [k], out [m, n], mode="add") = out; out[idx[i]] += y[i]
    scatter(y [k, n], idx [k], out [m, n], mode="set") = out; out[idx[i]]  = y[i]

Informed routing and Duo's capacity mode select k of m tokens (top-k with a capacity factor: k is
static, tokens beyond capacity are simply not selected), run a unit on them and write the
results back: `scatter(unit(gather_matmul(x, idx, w_in)), idx, base)`. The kernels fetch the
selected rows inside the kernel, so the gathered copy of x never lands in HBM; the scatter writes
only the selected rows of `out` (aliased, updated in place when the caller donates it).

Indices are clipped to [0, m) and must be distinct (top-k's are); with repeated indices the
result of the kernels is unspecified. w is cast to x.dtype and y to out.dtype; f32 accumulation.
Gradients: a custom VJP whose backward is the reference's VJP in XLA (gather / scatter-add /
matmul), not a kernel. Blocks: see tpu.py and gpu.py (None keeps the backend's default).
"""
from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels import _common
from pallas_kernels import _dispatch
from pallas_kernels.gather_matmul import gpu
from pallas_kernels.gather_matmul import reference
from pallas_kernels.gather_matmul import tpu

MODES = ("add", "set")


def _blocks(**blocks):
  return {k: v for k, v in blocks.items() if v is not None}


def gather_matmul(x: jax.Array, idx: jax.Array, w: jax.Array, *, impl: Optional[str] = None,
                  block_rows: Optional[int] = None, block_n: Optional[int] = None,
                  block_d: Optional[int] = None) -> jax.Array:
  """x[idx] @ w without materialising x[idx]: x [m, d], idx int [k], w [d, n] -> [k, n]."""
  if x.ndim != 2 or w.ndim != 2 or idx.ndim != 1 or w.shape[0] != x.shape[1]:
    raise ValueError(f"gather_matmul: needs x [m, d], idx [k], w [d, n]; got {x.shape}, "
                     f"{idx.shape}, {w.shape}.")
  if idx.shape[0] == 0:  # a capacity that rounded to zero: no kernel has an empty grid
    return jnp.zeros((0, w.shape[1]), x.dtype)
  tpu_blocks = _blocks(block_rows=block_rows, block_n=block_n)
  gpu_blocks = _blocks(block_rows=block_rows, block_n=block_n, block_d=block_d)

  def kernel(backend, blocks, interpret):
    return _common.with_reference_vjp(
        lambda *a: backend.gather_matmul(*a, interpret=interpret, **blocks),
        reference.gather_matmul, diff_argnums=(0, 2))

  return _dispatch.dispatch(
      impl, x, jnp.asarray(idx, jnp.int32), w.astype(x.dtype),
      reference=reference.gather_matmul,
      tpu=lambda *a, interpret: kernel(tpu, tpu_blocks, interpret)(*a),
      gpu=lambda *a, interpret: kernel(gpu, gpu_blocks, interpret)(*a))


def scatter(y: jax.Array, idx: jax.Array, out: jax.Array, *, mode: str = "add",
            impl: Optional[str] = None, block_rows: Optional[int] = None,
            block_n: Optional[int] = None) -> jax.Array:
  """Writes ("set") or adds ("add") rows y [k, n] into out [m, n] at rows idx [k]."""
  if mode not in MODES:
    raise ValueError(f"scatter: mode {mode!r} is not one of {MODES}.")
  if y.ndim != 2 or out.ndim != 2 or idx.shape != (y.shape[0],) or y.shape[1] != out.shape[1]:
    raise ValueError(f"scatter: needs y [k, n], idx [k], out [m, n]; got {y.shape}, "
                     f"{idx.shape}, {out.shape}.")
  if idx.shape[0] == 0:
    return out
  tpu_blocks = _blocks(block_rows=block_rows)
  gpu_blocks = _blocks(block_rows=block_rows, block_n=block_n)

  def ref(y, idx, out):
    return reference.scatter(y, idx, out, mode=mode)

  def kernel(backend, blocks, interpret):
    return _common.with_reference_vjp(
        lambda *a: backend.scatter(*a, mode=mode, interpret=interpret, **blocks),
        ref, diff_argnums=(0, 2))

  return _dispatch.dispatch(
      impl, y.astype(out.dtype), jnp.asarray(idx, jnp.int32), out,
      reference=ref,
      tpu=lambda *a, interpret: kernel(tpu, tpu_blocks, interpret)(*a),
      gpu=lambda *a, interpret: kernel(gpu, gpu_blocks, interpret)(*a))


__all__ = ["gather_matmul", "scatter", "MODES"]
