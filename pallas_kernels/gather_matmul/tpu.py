"""gather_matmul and scatter on TPU (Pallas + Mosaic): rows move by DMA, indices by scalar prefetch.

gather_matmul: out[i] = x[idx[i]] @ w. The grid is (row blocks of idx, column blocks of w). At the
first column block of a row block the kernel DMAs its `block_rows` rows of x, addressed by the
scalar-prefetched idx, straight from HBM into a VMEM scratch [block_rows, d]; the following
column blocks reuse them. The gathered copy never exists in HBM. Blocks: block_rows (multiple
of 8, 16 for bf16) x block_n (multiple of 128) output tiles, the whole of d in VMEM (VMEM holds
block_rows * d + 2 * d * block_n elements: split d upstream beyond ~8k in bf16). Defaults 128 x 256.

scatter: the output aliases `out` in HBM. Each grid step holds `block_rows` rows of y in VMEM
and DMAs row i to out[idx[i]] ("set"); "add" first DMAs those rows of out into VMEM, adds in f32,
then writes them back. Rows of a block move concurrently, so indices must be distinct (within a
block two reads of the same row would lose an update; top-k indices are distinct). Default
block_rows 128; the whole of n per row.

Capacity: k (the length of idx) is the static capacity of the routed set; choosing which rows
fill it, and what happens to rows that do not fit, is the caller's routing.
"""
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _common


def _row_copies(count, valid, make_copy):
  """Starts `count` row DMAs, then waits on all of them (rows past the end are skipped)."""
  @pl.loop(0, count)
  def _start(r):
    @pl.when(valid(r))
    def _():
      make_copy(r).start()

  @pl.loop(0, count)
  def _wait(r):
    @pl.when(valid(r))
    def _():
      make_copy(r).wait()


def gather_matmul(x, idx, w, *, block_rows=128, block_n=256, interpret=False):
  m, d = x.shape
  k = idx.shape[0]
  n = w.shape[1]
  tm = _common.tpu_block(k, block_rows, _common.sublane_align(x.dtype))
  tn = _common.tpu_block(n, block_n, 128)
  idx = jnp.clip(idx.astype(jnp.int32), 0, m - 1)

  def kernel(idx_ref, x_hbm, w_ref, out_ref, rows_ref, sem):
    i = pl.program_id(0)

    @pl.when(pl.program_id(1) == 0)
    def _gather():
      _row_copies(
          tm, lambda r: i * tm + r < k,
          lambda r: pltpu.make_async_copy(x_hbm.at[pl.ds(idx_ref[i * tm + r], 1)],
                                          rows_ref.at[pl.ds(r, 1)], sem.at[0]))

    out_ref[...] = jnp.dot(rows_ref[...], w_ref[...],
                           preferred_element_type=jnp.float32).astype(out_ref.dtype)

  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((k, n), x.dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(_common.cdiv(k, tm), _common.cdiv(n, tn)),
          in_specs=[pl.BlockSpec(memory_space=pl.ANY),
                    pl.BlockSpec((d, tn), lambda i, j, idx_ref: (0, j))],
          out_specs=pl.BlockSpec((tm, tn), lambda i, j, idx_ref: (i, j)),
          scratch_shapes=[pltpu.VMEM((tm, d), x.dtype), pltpu.SemaphoreType.DMA((1,))]),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      interpret=_common.TPU_INTERPRET if interpret else False,
      name="gather_matmul")(idx, x, w)


def scatter(y, idx, out, *, mode="add", block_rows=128, interpret=False):
  k, n = y.shape
  m = out.shape[0]
  tm = _common.tpu_block(k, block_rows, _common.sublane_align(out.dtype))
  idx = jnp.clip(idx.astype(jnp.int32), 0, m - 1)

  def kernel(idx_ref, y_ref, out_in_hbm, out_hbm, buf_ref, sem):
    del out_in_hbm  # the same HBM buffer as out_hbm (aliased)
    i = pl.program_id(0)
    valid = lambda r: i * tm + r < k
    target = lambda r: out_hbm.at[pl.ds(idx_ref[i * tm + r], 1)]
    if mode == "add":
      _row_copies(tm, valid, lambda r: pltpu.make_async_copy(target(r), buf_ref.at[pl.ds(r, 1)],
                                                             sem.at[0]))
      buf_ref[...] = (buf_ref[...].astype(jnp.float32)
                      + y_ref[...].astype(jnp.float32)).astype(buf_ref.dtype)
      source = buf_ref
    else:
      source = y_ref
    _row_copies(tm, valid, lambda r: pltpu.make_async_copy(source.at[pl.ds(r, 1)], target(r),
                                                           sem.at[1]))

  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct(out.shape, out.dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(_common.cdiv(k, tm),),
          in_specs=[pl.BlockSpec((tm, n), lambda i, idx_ref: (i, 0)),
                    pl.BlockSpec(memory_space=pl.ANY)],
          out_specs=pl.BlockSpec(memory_space=pl.ANY),
          scratch_shapes=[pltpu.VMEM((tm, n), out.dtype), pltpu.SemaphoreType.DMA((2,))]),
      input_output_aliases={2: 0},
      compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
      interpret=_common.TPU_INTERPRET if interpret else False,
      name=f"scatter_{mode}")(idx, y.astype(out.dtype), out)
