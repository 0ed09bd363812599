"""gather_matmul, gather_rows and scatter on TPU (Pallas + Mosaic): rows move by DMA, indices by
scalar prefetch.

gather_matmul: out[i] = x[idx[i]] @ w. The grid is (row blocks of idx, column blocks of w). At the
first column block of a row block the kernel starts the DMAs of its `block_rows` rows of x,
addressed by the scalar-prefetched idx, straight from HBM into a VMEM scratch [block_rows, d],
one DMA semaphore per chunk of rows (`_chunks`: up to 4 chunks of >= one sublane tile); it then
waits for the first chunk, multiplies it, waits for the next, ..., so the later chunks' DMAs
overlap the earlier chunks' matmuls. The following column blocks reuse the rows. The gathered
copy never exists in HBM. Blocks: block_rows (multiple of 8, 16 for bf16) x block_n (multiple of
128) output tiles, the whole of d in VMEM (block_rows * d + 2 * d * block_n elements: 128 x 256
blocks in bf16 fit the 16 MiB default scoped VMEM of v5e up to d ~ 12k). Defaults 128 x 256. Not
done (untimed, no TPU was available): prefetching the next row block's rows during this block's
last column block, which would hide the first chunk's DMA too.

gather_tmatmul: x[idx]^T g [d, n], gather_matmul's dw. Grid (d blocks, n blocks, row blocks of
idx): each step DMAs its rows' d-slice (block_d, a multiple of 128 dividing d, or the whole d)
into VMEM, masks the rows past k, and accumulates rows^T g_blk into an f32 [block_d, block_n]
scratch. Rows are fetched once per column block of n (n / block_n times; defaults 128 x 256 x 256).

gather_rows: out[i] = x[idx[i]], one grid step per row block, each row DMAd from HBM straight into
the output block (the transpose of scatter "set"; its backward for y).

scatter: the output aliases `out` in HBM. Each grid step holds `block_rows` rows of y in VMEM
and DMAs row i to out[idx[i]] ("set"); "add" first starts the DMAs of those rows of out into VMEM
(a semaphore per chunk), and as each chunk lands adds it in f32 and starts its write-back, so
reads, adds and writes of different chunks overlap. Rows of a block move concurrently, so indices
must be distinct (within a block two reads of the same row would lose an update; top-k indices
are distinct). Default block_rows 128; the whole of n per row.

Every pallas_call carries a pl.CostEstimate (FLOPs, bytes moved). Capacity: k (the length of
idx) is the static capacity of the routed set; choosing which rows fill it, and what happens to
rows that do not fit, is the caller's routing.
"""
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _common

MAX_CHUNKS = 4


def _chunks(rows: int, align: int) -> int:
  """Rows per DMA chunk of a `rows`-row block: a multiple of `align` dividing it, at most
  MAX_CHUNKS chunks (fewer, larger chunks keep the MXU fed; more overlap more)."""
  if rows % align:
    return rows
  tiles = rows // align
  per = next(c for c in range(-(-tiles // MAX_CHUNKS), tiles + 1) if tiles % c == 0)
  return per * align


def _interpret(interpret):
  return _common.TPU_INTERPRET if interpret else False


def _row_loop(start, stop, valid, fn):
  """fn(r) for the rows r in [start, stop) with valid(r) (rows past k are skipped)."""
  @pl.loop(start, stop)
  def _(r):
    @pl.when(valid(r))
    def _():
      fn(r)


def gather_matmul(x, idx, w, *, block_rows=128, block_n=256, interpret=False):
  m, d = x.shape
  k = idx.shape[0]
  n = w.shape[1]
  tm = _common.tpu_block(k, block_rows, _common.sublane_align(x.dtype))
  tn = _common.tpu_block(n, block_n, 128)
  chunk = _chunks(tm, _common.sublane_align(x.dtype))
  n_chunks = tm // chunk
  idx = jnp.clip(idx.astype(jnp.int32), 0, m - 1)
  idx, x, w = _common.match_varying(idx, x, w)

  def kernel(idx_ref, x_hbm, w_ref, out_ref, rows_ref, sems):
    i = pl.program_id(0)
    valid = lambda r: i * tm + r < k
    copy = lambda r: pltpu.make_async_copy(x_hbm.at[pl.ds(idx_ref[i * tm + r], 1)],
                                           rows_ref.at[pl.ds(r, 1)], sems.at[jax.lax.div(r, chunk)])

    def matmul(rows):
      return jnp.dot(rows_ref[rows], w_ref[...],
                     preferred_element_type=jnp.float32).astype(out_ref.dtype)

    @pl.when(pl.program_id(1) == 0)
    def _gather_and_multiply():
      _row_loop(0, tm, valid, lambda r: copy(r).start())
      for c in range(n_chunks):  # static: at most MAX_CHUNKS
        _row_loop(c * chunk, (c + 1) * chunk, valid, lambda r: copy(r).wait())
        out_ref[pl.ds(c * chunk, chunk)] = matmul(pl.ds(c * chunk, chunk))

    @pl.when(pl.program_id(1) > 0)
    def _multiply():
      out_ref[...] = matmul(slice(None))

  itemsize = jnp.dtype(x.dtype).itemsize
  row_blocks = _common.cdiv(k, tm)
  return pl.pallas_call(
      kernel,
      out_shape=_common.out_struct((k, n), x.dtype, x),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(row_blocks, _common.cdiv(n, tn)),
          in_specs=[pl.BlockSpec(memory_space=pl.ANY),
                    pl.BlockSpec((d, tn), lambda i, j, idx_ref: (0, j))],
          out_specs=pl.BlockSpec((tm, tn), lambda i, j, idx_ref: (i, j)),
          scratch_shapes=[pltpu.VMEM((tm, d), x.dtype),
                          pltpu.SemaphoreType.DMA((n_chunks,))]),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      cost_estimate=_common.cost(2 * k * d * n,
                                 itemsize * (k * d + row_blocks * d * n + k * n) + 4 * k),
      interpret=_interpret(interpret),
      name="gather_matmul")(idx, x, w)


def _divisor_block(size: int, block: int, align: int) -> int:
  """The largest multiple of `align` <= block dividing size, else the whole size (a block DMAd
  from a row slice must not run past the row)."""
  if size <= block:
    return size
  return next((b for b in range(block // align * align, 0, -align) if size % b == 0), size)


def gather_tmatmul(x, idx, g, *, block_rows=128, block_d=256, block_n=256, interpret=False):
  """x[idx]^T @ g: x [m, d], idx [k], g [k, n] -> [d, n] in x.dtype (gather_matmul's dw)."""
  m, d = x.shape
  k, n = g.shape
  align = _common.sublane_align(x.dtype)
  tm = _common.tpu_block(k, block_rows, align)
  td = _divisor_block(d, block_d, 128)
  tn = _common.tpu_block(n, block_n, 128)
  k_blocks = _common.cdiv(k, tm)
  idx = jnp.clip(idx.astype(jnp.int32), 0, m - 1)
  idx, x, g = _common.match_varying(idx, x, g.astype(x.dtype))

  def kernel(idx_ref, x_hbm, g_ref, out_ref, rows_ref, acc_ref, sem):
    di, kb = pl.program_id(0), pl.program_id(2)
    valid = lambda r: kb * tm + r < k
    copy = lambda r: pltpu.make_async_copy(
        x_hbm.at[pl.ds(idx_ref[kb * tm + r], 1), pl.ds(di * td, td)],
        rows_ref.at[pl.ds(r, 1)], sem.at[0])

    @pl.when(kb == 0)
    def _zero():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    _row_loop(0, tm, valid, lambda r: copy(r).start())
    _row_loop(0, tm, valid, lambda r: copy(r).wait())
    # Rows past k (the last block): neither fetched nor in g; zero both sides.
    rows = _common.tpu_select(
        kb * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, td), 0) < k, rows_ref[...])
    grads = _common.tpu_select(
        kb * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, tn), 0) < k, g_ref[...])
    acc_ref[...] += jax.lax.dot_general(rows, grads, (((0,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32)

    @pl.when(kb == k_blocks - 1)
    def _store():
      out_ref[...] = acc_ref[...].astype(out_ref.dtype)

  itemsize = jnp.dtype(x.dtype).itemsize
  n_blocks = _common.cdiv(n, tn)
  return pl.pallas_call(
      kernel,
      out_shape=_common.out_struct((d, n), x.dtype, x),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(d // td, n_blocks, k_blocks),
          in_specs=[pl.BlockSpec(memory_space=pl.ANY),
                    pl.BlockSpec((tm, tn), lambda di, j, kb, idx_ref: (kb, j))],
          out_specs=pl.BlockSpec((td, tn), lambda di, j, kb, idx_ref: (di, j)),
          scratch_shapes=[pltpu.VMEM((tm, td), x.dtype), pltpu.VMEM((td, tn), jnp.float32),
                          pltpu.SemaphoreType.DMA((1,))]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      cost_estimate=_common.cost(2 * k * d * n, itemsize * (n_blocks * k * d + (d // td) * k * n
                                                            + d * n) + 4 * k),
      interpret=_interpret(interpret),
      name="gather_tmatmul")(idx, x, g)


def gather_rows(x, idx, *, block_rows=128, interpret=False):
  m, n = x.shape
  k = idx.shape[0]
  tm = _common.tpu_block(k, block_rows, _common.sublane_align(x.dtype))
  idx = jnp.clip(idx.astype(jnp.int32), 0, m - 1)
  idx, x = _common.match_varying(idx, x)

  def kernel(idx_ref, x_hbm, out_ref, sem):
    i = pl.program_id(0)
    valid = lambda r: i * tm + r < k
    copy = lambda r: pltpu.make_async_copy(x_hbm.at[pl.ds(idx_ref[i * tm + r], 1)],
                                           out_ref.at[pl.ds(r, 1)], sem.at[0])
    _row_loop(0, tm, valid, lambda r: copy(r).start())
    _row_loop(0, tm, valid, lambda r: copy(r).wait())

  return pl.pallas_call(
      kernel,
      out_shape=_common.out_struct((k, n), x.dtype, x),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(_common.cdiv(k, tm),),
          in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
          out_specs=pl.BlockSpec((tm, n), lambda i, idx_ref: (i, 0)),
          scratch_shapes=[pltpu.SemaphoreType.DMA((1,))]),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      cost_estimate=_common.cost(0, 2 * k * n * jnp.dtype(x.dtype).itemsize + 4 * k),
      interpret=_interpret(interpret),
      name="gather_rows")(idx, x)


def scatter(y, idx, out, *, mode="add", block_rows=128, interpret=False):
  k, n = y.shape
  m = out.shape[0]
  align = _common.sublane_align(out.dtype)
  tm = _common.tpu_block(k, block_rows, align)
  chunk = _chunks(tm, align)
  n_chunks = tm // chunk
  idx = jnp.clip(idx.astype(jnp.int32), 0, m - 1)
  idx, y, out = _common.match_varying(idx, y.astype(out.dtype), out)

  def kernel(idx_ref, y_ref, out_in_hbm, out_hbm, buf_ref, read_sems, write_sem):
    del out_in_hbm  # the same HBM buffer as out_hbm (aliased)
    i = pl.program_id(0)
    valid = lambda r: i * tm + r < k
    target = lambda r: out_hbm.at[pl.ds(idx_ref[i * tm + r], 1)]
    source = buf_ref if mode == "add" else y_ref
    write = lambda r: pltpu.make_async_copy(source.at[pl.ds(r, 1)], target(r), write_sem.at[0])
    if mode == "add":
      read = lambda r: pltpu.make_async_copy(target(r), buf_ref.at[pl.ds(r, 1)],
                                             read_sems.at[jax.lax.div(r, chunk)])
      _row_loop(0, tm, valid, lambda r: read(r).start())
      for c in range(n_chunks):  # static: at most MAX_CHUNKS
        rows = pl.ds(c * chunk, chunk)
        _row_loop(c * chunk, (c + 1) * chunk, valid, lambda r: read(r).wait())
        buf_ref[rows] = (buf_ref[rows].astype(jnp.float32)
                         + y_ref[rows].astype(jnp.float32)).astype(buf_ref.dtype)
        _row_loop(c * chunk, (c + 1) * chunk, valid, lambda r: write(r).start())
    else:
      _row_loop(0, tm, valid, lambda r: write(r).start())
    _row_loop(0, tm, valid, lambda r: write(r).wait())

  itemsize = jnp.dtype(out.dtype).itemsize
  return pl.pallas_call(
      kernel,
      out_shape=_common.out_struct(out.shape, out.dtype, out),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(_common.cdiv(k, tm),),
          in_specs=[pl.BlockSpec((tm, n), lambda i, idx_ref: (i, 0)),
                    pl.BlockSpec(memory_space=pl.ANY)],
          out_specs=pl.BlockSpec(memory_space=pl.ANY),
          scratch_shapes=[pltpu.VMEM((tm, n), out.dtype),
                          pltpu.SemaphoreType.DMA((n_chunks,)),
                          pltpu.SemaphoreType.DMA((1,))]),
      input_output_aliases={2: 0},
      compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
      cost_estimate=_common.cost(k * n if mode == "add" else 0,
                                 itemsize * k * n * (3 if mode == "add" else 2) + 4 * k),
      interpret=_interpret(interpret),
      name=f"scatter_{mode}")(idx, y, out)
