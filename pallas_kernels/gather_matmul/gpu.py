"""gather_matmul, gather_rows and scatter on GPU (Pallas lowered through Triton): pointer gathers
and scatters.

gather_matmul: out[i] = x[idx[i]] @ w. One program per (block_rows of idx, block_n of w); it
loads its indices, then loops over d in block_d chunks, loading x rows through pointers
computed from the indices (a gather in registers, never a copy in HBM) and multiplying with the
matching block of w. Blocks, warps and stages per shape from `_common.triton_tiles` (None);
loads and stores are masked.

gather_tmatmul: x[idx]^T g [d, n], gather_matmul's dw. One program per (block_d, block_n) output
tile, looping over idx in block_rows chunks: rows loaded through pointers, transposed into the
dot (tiles per `_common.triton_tiles`, k as the depth).

gather_rows: out[i] = x[idx[i]], one program per (block_rows, block_n) tile (scatter "set"'s
transpose: its backward for y).

scatter: the output aliases `out`. One program per (block_rows, block_n) tile of y stores its rows
to out[idx] ("set") or loads those rows, adds in f32 and stores ("add"). Indices must be distinct:
two programs updating the same row would race. Memory-bound: 64 x 128 tiles, 4 warps, unless set.

Every pallas_call carries a pl.CostEstimate. Capacity: k (the length of idx) is the static
capacity of the routed set; choosing which rows fill it, and what happens to rows that do not
fit, is the caller's routing.
"""
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _common

_ANY = pl.BlockSpec(memory_space=pl.ANY)


def _copy_blocks(k, n, block_rows, block_n):
  return (_common.gpu_block(k, block_rows or 64), _common.gpu_block(n, block_n or 128))


def gather_matmul(x, idx, w, *, block_rows=None, block_n=None, block_d=None, interpret=False):
  m, d = x.shape
  k = idx.shape[0]
  n = w.shape[1]
  bm, bn, bd, params = _common.triton_tiles(k, n, d, x.dtype)
  bm = _common.gpu_block(k, block_rows) if block_rows else bm
  bn = _common.gpu_block(n, block_n) if block_n else bn
  bd = _common.gpu_block(d, block_d) if block_d else bd
  idx = jnp.clip(idx.astype(jnp.int32), 0, m - 1)
  idx, x, w = _common.match_varying(idx, x, w)

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

  itemsize = jnp.dtype(x.dtype).itemsize
  return pl.pallas_call(
      kernel,
      out_shape=_common.out_struct((k, n), x.dtype, x),
      grid=(_common.cdiv(k, bm), _common.cdiv(n, bn)),
      in_specs=[_ANY] * 3,
      out_specs=_ANY,
      compiler_params=params,
      cost_estimate=_common.cost(2 * k * d * n, itemsize * (k * d + d * n + k * n) + 4 * k),
      interpret=interpret,
      name="gather_matmul")(idx, x, w)


def gather_tmatmul(x, idx, g, *, block_rows=None, block_d=None, block_n=None, interpret=False):
  """x[idx]^T @ g: x [m, d], idx [k], g [k, n] -> [d, n] in x.dtype (gather_matmul's dw)."""
  m, d = x.shape
  k, n = g.shape
  # The output's rows are d, the loop (depth) runs over the k gathered rows.
  bd, bn, bm, params = _common.triton_tiles(d, n, k, x.dtype)
  bm = _common.gpu_block(k, block_rows) if block_rows else bm
  bd = _common.gpu_block(d, block_d) if block_d else bd
  bn = _common.gpu_block(n, block_n) if block_n else bn
  idx = jnp.clip(idx.astype(jnp.int32), 0, m - 1)
  idx, x, g = _common.match_varying(idx, x, g.astype(x.dtype))

  def kernel(idx_ref, x_ref, g_ref, out_ref):
    di, j = pl.program_id(0), pl.program_id(1)
    cols_d = di * bd + jnp.arange(bd)
    cols_n = j * bn + jnp.arange(bn)
    d_ok, n_ok = cols_d < d, cols_n < n

    def one_chunk(c, acc):
      row_ok = c * bm + jnp.arange(bm) < k
      rows = pltriton.load(idx_ref.at[pl.ds(c * bm, bm)], mask=row_ok, other=0)
      xs = pltriton.load(x_ref.at[rows[:, None], cols_d[None, :]],
                         mask=row_ok[:, None] & d_ok[None, :], other=0)
      gs = pltriton.load(g_ref.at[pl.ds(c * bm, bm), pl.ds(j * bn, bn)],
                         mask=row_ok[:, None] & n_ok[None, :], other=0)
      return acc + pltriton.dot(xs, gs, trans_a=True)

    acc = jax.lax.fori_loop(0, _common.cdiv(k, bm), one_chunk, jnp.zeros((bd, bn), jnp.float32))
    pltriton.store(out_ref.at[pl.ds(di * bd, bd), pl.ds(j * bn, bn)], acc.astype(out_ref.dtype),
                   mask=d_ok[:, None] & n_ok[None, :])

  itemsize = jnp.dtype(x.dtype).itemsize
  return pl.pallas_call(
      kernel,
      out_shape=_common.out_struct((d, n), x.dtype, x),
      grid=(_common.cdiv(d, bd), _common.cdiv(n, bn)),
      in_specs=[_ANY] * 3,
      out_specs=_ANY,
      compiler_params=params,
      cost_estimate=_common.cost(2 * k * d * n, itemsize * (k * d + k * n + d * n) + 4 * k),
      interpret=interpret,
      name="gather_tmatmul")(idx, x, g)


def gather_rows(x, idx, *, block_rows=None, block_n=None, interpret=False):
  m, n = x.shape
  k = idx.shape[0]
  bm, bn = _copy_blocks(k, n, block_rows, block_n)
  idx = jnp.clip(idx.astype(jnp.int32), 0, m - 1)
  idx, x = _common.match_varying(idx, x)

  def kernel(idx_ref, x_ref, out_ref):
    i, j = pl.program_id(0), pl.program_id(1)
    row_ok = i * bm + jnp.arange(bm) < k
    rows = pltriton.load(idx_ref.at[pl.ds(i * bm, bm)], mask=row_ok, other=0)
    cols = j * bn + jnp.arange(bn)
    ok = row_ok[:, None] & (cols < n)[None, :]
    vals = pltriton.load(x_ref.at[rows[:, None], cols[None, :]], mask=ok, other=0)
    pltriton.store(out_ref.at[pl.ds(i * bm, bm), pl.ds(j * bn, bn)], vals, mask=ok)

  return pl.pallas_call(
      kernel,
      out_shape=_common.out_struct((k, n), x.dtype, x),
      grid=(_common.cdiv(k, bm), _common.cdiv(n, bn)),
      in_specs=[_ANY] * 2,
      out_specs=_ANY,
      compiler_params=_common.triton_params(),
      cost_estimate=_common.cost(0, 2 * k * n * jnp.dtype(x.dtype).itemsize + 4 * k),
      interpret=interpret,
      name="gather_rows")(idx, x)


def scatter(y, idx, out, *, mode="add", block_rows=None, block_n=None, interpret=False):
  k, n = y.shape
  m = out.shape[0]
  bm, bn = _copy_blocks(k, n, block_rows, block_n)
  idx = jnp.clip(idx.astype(jnp.int32), 0, m - 1)
  idx, y, out = _common.match_varying(idx, y.astype(out.dtype), out)

  def kernel(idx_ref, y_ref, out_in_ref, out_ref):
    del out_in_ref  # the same buffer as out_ref (aliased)
    i, j = pl.program_id(0), pl.program_id(1)
    row_ok = i * bm + jnp.arange(bm) < k
    # Masked rows point past the end: they are never stored (the HLO interpreter drops the
    # out-of-bounds update; a duplicate of a real row would race with its store there).
    rows = pltriton.load(idx_ref.at[pl.ds(i * bm, bm)], mask=row_ok, other=m)
    cols = j * bn + jnp.arange(bn)
    ok = row_ok[:, None] & (cols < n)[None, :]
    vals = pltriton.load(y_ref.at[pl.ds(i * bm, bm), pl.ds(j * bn, bn)], mask=ok, other=0)
    target = out_ref.at[rows[:, None], cols[None, :]]
    if mode == "add":
      vals = pltriton.load(target, mask=ok, other=0).astype(jnp.float32) + vals.astype(jnp.float32)
    pltriton.store(target, vals.astype(out_ref.dtype), mask=ok)

  itemsize = jnp.dtype(out.dtype).itemsize
  return pl.pallas_call(
      kernel,
      out_shape=_common.out_struct(out.shape, out.dtype, out),
      grid=(_common.cdiv(k, bm), _common.cdiv(n, bn)),
      in_specs=[_ANY] * 3,
      out_specs=_ANY,
      input_output_aliases={2: 0},
      compiler_params=_common.triton_params(),
      cost_estimate=_common.cost(k * n if mode == "add" else 0,
                                 itemsize * k * n * (3 if mode == "add" else 2) + 4 * k),
      interpret=interpret,
      name=f"scatter_{mode}")(idx, y, out)
