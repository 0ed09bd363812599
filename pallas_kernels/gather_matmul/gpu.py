"""gather_matmul and scatter on GPU (Pallas lowered through Triton): pointer gathers and scatters.

gather_matmul: out[i] = x[idx[i]] @ w. One program per (block_rows of idx, block_n of w); it
loads its indices, then loops over d in block_d chunks, loading x rows through pointers
computed from the indices (a gather in registers, never a copy in HBM) and multiplying with the
matching block of w. Defaults 32 x 64 x 32, powers of two >= 16; loads and stores are masked.

scatter: the output aliases `out`. One program per (block_rows, block_n) tile of y stores its rows
to out[idx] ("set") or loads those rows, adds in f32 and stores ("add"). Indices must be distinct:
two programs updating the same row would race. Defaults 32 x 64.

Capacity: k (the length of idx) is the static capacity of the routed set; choosing which rows
fill it, and what happens to rows that do not fit, is the caller's routing.
"""
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _common

_ANY = pl.BlockSpec(memory_space=pl.ANY)


def gather_matmul(x, idx, w, *, block_rows=32, block_n=64, block_d=32, interpret=False):
  m, d = x.shape
  k = idx.shape[0]
  n = w.shape[1]
  bm, bn, bd = (_common.gpu_block(k, block_rows), _common.gpu_block(n, block_n),
                _common.gpu_block(d, block_d))
  idx = jnp.clip(idx.astype(jnp.int32), 0, m - 1)

  def kernel(idx_ref, x_ref, w_ref, out_ref):
    i, j = pl.program_id(0), pl.program_id(1)
    row_ok = i * bm + jnp.arange(bm) < k
    rows = pltriton.load(idx_ref.at[pl.ds(i * bm, bm)], mask=row_ok, other=0)
    cols = j * bn + jnp.arange(bn)
    col_ok = cols < n

    def one_chunk(c, acc):
      ks = c * bd + jnp.arange(bd)
      k_ok = ks < d
      xs = pltriton.load(x_ref.at[rows[:, None], ks[None, :]],
                         mask=row_ok[:, None] & k_ok[None, :], other=0)
      ws = pltriton.load(w_ref.at[pl.ds(c * bd, bd), pl.ds(j * bn, bn)],
                         mask=k_ok[:, None] & col_ok[None, :], other=0)
      return acc + pltriton.dot(xs, ws)

    acc = jax.lax.fori_loop(0, _common.cdiv(d, bd), one_chunk, jnp.zeros((bm, bn), jnp.float32))
    pltriton.store(out_ref.at[pl.ds(i * bm, bm), pl.ds(j * bn, bn)], acc.astype(out_ref.dtype),
                   mask=row_ok[:, None] & col_ok[None, :])

  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((k, n), x.dtype),
      grid=(_common.cdiv(k, bm), _common.cdiv(n, bn)),
      in_specs=[_ANY] * 3,
      out_specs=_ANY,
      compiler_params=_common.triton_params(),
      interpret=interpret,
      name="gather_matmul")(idx, x, w)


def scatter(y, idx, out, *, mode="add", block_rows=32, block_n=64, interpret=False):
  k, n = y.shape
  m = out.shape[0]
  bm, bn = _common.gpu_block(k, block_rows), _common.gpu_block(n, block_n)
  idx = jnp.clip(idx.astype(jnp.int32), 0, m - 1)

  def kernel(idx_ref, y_ref, out_in_ref, out_ref):
    del out_in_ref  # the same buffer as out_ref (aliased)
    i, j = pl.program_id(0), pl.program_id(1)
    row_ok = i * bm + jnp.arange(bm) < k
    rows = pltriton.load(idx_ref.at[pl.ds(i * bm, bm)], mask=row_ok, other=0)
    cols = j * bn + jnp.arange(bn)
    ok = row_ok[:, None] & (cols < n)[None, :]
    vals = pltriton.load(y_ref.at[pl.ds(i * bm, bm), pl.ds(j * bn, bn)], mask=ok, other=0)
    target = out_ref.at[rows[:, None], cols[None, :]]
    if mode == "add":
      vals = pltriton.load(target, mask=ok, other=0).astype(jnp.float32) + vals.astype(jnp.float32)
    pltriton.store(target, vals.astype(out_ref.dtype), mask=ok)

  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct(out.shape, out.dtype),
      grid=(_common.cdiv(k, bm), _common.cdiv(n, bn)),
      in_specs=[_ANY] * 3,
      out_specs=_ANY,
      input_output_aliases={2: 0},
      compiler_params=_common.triton_params(),
      interpret=interpret,
      name=f"scatter_{mode}")(idx, y.astype(out.dtype), out)
