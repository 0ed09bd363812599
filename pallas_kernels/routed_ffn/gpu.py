"""routed_ffn on GPU: grouped matmuls in Pallas lowered through Triton.

gmm:  out[r] = lhs[r] @ rhs[g(r)] for rows r in group g; rows in no group get 0.
tgmm: out[g] = lhs[rows of g]^T @ rhs[rows of g].

gmm runs one program per (row tile, column tile). XLA precomputes, per row tile, the range of
groups whose rows it holds (Triton has no scalar prefetch); the program loops over those groups
with a dynamic trip count, masking the rows of other groups, and over the group's k tiles up to
its width limit. A tile whose rows are all skipped has an empty group range: it loads nothing,
multiplies nothing and stores its zeros. tgmm runs one program per (group,
a tile, b tile) and loops over that group's rows; an empty group, or a tile past its width,
stores zeros without a matmul.

Blocks are powers of two (Triton), at least 16 (tensor-core dot), clamped down to the next power
of two above small dimensions; loads and stores are masked, so no dimension needs to divide a
block. Defaults by shape (`default_blocks`): 128 x 128 output tiles with 8 warps when both
dimensions reach 1024, else 64 x 64 with 4; block_k 64 for 16-bit inputs, 32 for float32 (twice
the shared memory per element); 3 pipeline stages (about 96 KiB of shared memory at the largest
tiles, within an H100's 228 KiB). Chosen from Triton's usual matmul configurations, not tuned
on hardware here (no GPU was available). f32 accumulation. No capacity: every row
of every group is computed, nothing overflows.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _common
from pallas_kernels.routed_ffn import composed
from pallas_kernels.routed_ffn import reference

_ANY = pl.BlockSpec(memory_space=pl.ANY)


def _limits(limit, e, size):
  """Per-group limit clipped to the dimension: masks built from it must also exclude the
  padding of a partial last block."""
  return jnp.full((e,), size, jnp.int32) if limit is None else jnp.minimum(
      limit.astype(jnp.int32), size)


def default_blocks(rows: int, cols: int, dtype, block_m=None, block_k=None, block_n=None):
  """(block_m, block_k, block_n, num_warps): the shape rule of the module docstring, any block
  given explicitly kept. `rows` x `cols` is the output tile grid's extent."""
  wide = rows >= 1024 and cols >= 1024
  bm = block_m or (128 if wide else 64)
  bn = block_n or (128 if wide else 64)
  bk = block_k or (64 if jnp.dtype(dtype).itemsize <= 2 else 32)
  return bm, bk, bn, 8 if bm * bn >= 128 * 128 else 4


def tile_groups(group_sizes, m: int, bm: int):
  """(lo, hi) int32 [cdiv(m, bm)]: groups lo..hi hold rows of the tile; hi < lo if none."""
  starts, ends = reference.group_bounds(group_sizes, m)
  first_row = jnp.arange(_common.cdiv(m, bm), dtype=jnp.int32) * bm
  last_row = jnp.minimum(first_row + bm, ends[-1]) - 1
  lo = jnp.searchsorted(ends, first_row, side="right").astype(jnp.int32)
  hi = jnp.searchsorted(ends, last_row, side="right").astype(jnp.int32)
  routed = first_row < ends[-1]
  return lo, jnp.where(routed, hi, lo - 1)


def gmm(lhs, rhs, group_sizes, *, k_limit=None, n_limit=None, transpose_rhs=False,
        block_m=None, block_k=None, block_n=None, interpret=False):
  """Grouped matmul lhs [m, K] x rhs [E, K, N] (or [E, N, K] transposed) -> [m, N]."""
  m, k = lhs.shape
  e = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  block_m, block_k, block_n, warps = default_blocks(m, n, lhs.dtype, block_m, block_k, block_n)
  bm, bk, bn = (_common.gpu_block(m, block_m), _common.gpu_block(k, block_k),
                _common.gpu_block(n, block_n))
  lo, hi = tile_groups(group_sizes, m, bm)
  starts, ends = reference.group_bounds(group_sizes, m)
  k_limit, n_limit = _limits(k_limit, e, k), _limits(n_limit, e, n)
  operands = composed.match_varying(lo, hi, starts, ends, k_limit, n_limit, lhs, rhs)
  lhs = operands[-2]

  def kernel(lo_ref, hi_ref, s_ref, e_ref, k_lim_ref, n_lim_ref, lhs_ref, rhs_ref, out_ref):
    i, j = pl.program_id(0), pl.program_id(1)
    rows = i * bm + jnp.arange(bm)
    cols = j * bn + jnp.arange(bn)

    def one_group(g, acc):
      k_lim, n_lim = k_lim_ref[g], n_lim_ref[g]
      in_group = (rows >= s_ref[g]) & (rows < e_ref[g])
      col_ok = cols < n_lim

      def one_k_tile(kk, acc):
        ks = kk * bk + jnp.arange(bk)
        k_ok = ks < k_lim
        x = pltriton.load(lhs_ref.at[pl.ds(i * bm, bm), pl.ds(kk * bk, bk)],
                          mask=in_group[:, None] & k_ok[None, :], other=0)
        if transpose_rhs:
          w = pltriton.load(rhs_ref.at[g, pl.ds(j * bn, bn), pl.ds(kk * bk, bk)],
                            mask=col_ok[:, None] & k_ok[None, :], other=0)
        else:
          w = pltriton.load(rhs_ref.at[g, pl.ds(kk * bk, bk), pl.ds(j * bn, bn)],
                            mask=k_ok[:, None] & col_ok[None, :], other=0)
        return acc + pltriton.dot(x, w, trans_b=transpose_rhs)

      # Empty groups inside the range (start == end) would only multiply masked zeros.
      has_work = (j * bn < n_lim) & (e_ref[g] > s_ref[g])
      k_tiles = jnp.where(has_work, _common.cdiv(k_lim, bk), 0)
      return jax.lax.fori_loop(0, k_tiles, one_k_tile, acc)

    acc = jax.lax.fori_loop(lo_ref[i], hi_ref[i] + 1, one_group, jnp.zeros((bm, bn), jnp.float32))
    pltriton.store(out_ref.at[pl.ds(i * bm, bm), pl.ds(j * bn, bn)], acc.astype(out_ref.dtype),
                   mask=(rows < m)[:, None] & (cols < n)[None, :])

  return pl.pallas_call(
      kernel,
      out_shape=composed.out_struct((m, n), lhs.dtype, lhs),
      grid=(_common.cdiv(m, bm), _common.cdiv(n, bn)),
      in_specs=[_ANY] * 8,
      out_specs=_ANY,
      compiler_params=_common.triton_params(num_warps=warps, num_stages=3),
      cost_estimate=reference.gmm_cost(lhs, rhs, n),
      interpret=interpret,
      name="routed_gmm")(*operands)


def tgmm(lhs, rhs, group_sizes, *, a_limit=None, b_limit=None, out_dtype=None,
         block_m=None, block_k=None, block_n=None, interpret=False):
  """Per-group lhs^T rhs: lhs [m, A], rhs [m, B] -> [E, A, B]; A tiled by block_k, B by block_n
  (the output tile), the rows (the contraction) by block_m."""
  m, a = lhs.shape
  b = rhs.shape[1]
  e = group_sizes.shape[0]
  # The output tile is block_k x block_n here and block_m runs over the contraction.
  block_k, block_m, block_n, warps = default_blocks(a, b, lhs.dtype, block_k, block_m, block_n)
  bm, ba, bb = (_common.gpu_block(m, block_m), _common.gpu_block(a, block_k),
                _common.gpu_block(b, block_n))
  starts, ends = reference.group_bounds(group_sizes, m)
  a_limit, b_limit = _limits(a_limit, e, a), _limits(b_limit, e, b)
  operands = composed.match_varying(starts, ends, a_limit, b_limit, lhs, rhs)
  lhs = operands[-2]

  def kernel(s_ref, e_ref, a_lim_ref, b_lim_ref, lhs_ref, rhs_ref, out_ref):
    ai, bi, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = s_ref[g], e_ref[g]
    a_cols = ai * ba + jnp.arange(ba)
    b_cols = bi * bb + jnp.arange(bb)
    a_ok, b_ok = a_cols < a_lim_ref[g], b_cols < b_lim_ref[g]

    def one_row_tile(c, acc):
      r0 = start + c * bm
      row_ok = r0 + jnp.arange(bm) < end
      x = pltriton.load(lhs_ref.at[pl.ds(r0, bm), pl.ds(ai * ba, ba)],
                        mask=row_ok[:, None] & a_ok[None, :], other=0)
      y = pltriton.load(rhs_ref.at[pl.ds(r0, bm), pl.ds(bi * bb, bb)],
                        mask=row_ok[:, None] & b_ok[None, :], other=0)
      return acc + pltriton.dot(x, y, trans_a=True)

    in_width = (ai * ba < a_lim_ref[g]) & (bi * bb < b_lim_ref[g])
    row_tiles = jnp.where(in_width, _common.cdiv(end - start, bm), 0)
    acc = jax.lax.fori_loop(0, row_tiles, one_row_tile, jnp.zeros((ba, bb), jnp.float32))
    pltriton.store(out_ref.at[g, pl.ds(ai * ba, ba), pl.ds(bi * bb, bb)],
                   acc.astype(out_ref.dtype),
                   mask=(a_cols < a)[:, None] & (b_cols < b)[None, :])

  return pl.pallas_call(
      kernel,
      out_shape=composed.out_struct((e, a, b), out_dtype or lhs.dtype, lhs),
      grid=(_common.cdiv(a, ba), _common.cdiv(b, bb), e),
      in_specs=[_ANY] * 6,
      out_specs=_ANY,
      compiler_params=_common.triton_params(num_warps=warps, num_stages=3),
      cost_estimate=reference.tgmm_cost(lhs, rhs, e, out_dtype or lhs.dtype),
      interpret=interpret,
      name="routed_tgmm")(*operands)


def routed_ffn(x, group_sizes, w_in, w_out, widths, *, activation="gelu", block_m=None,
               block_k=None, block_n=None, interpret=False):
  """The routed FFN (see reference.py) from these kernels, with a kernel backward pass."""
  blocks = dict(block_m=block_m, block_k=block_k, block_n=block_n, interpret=interpret)
  ffn = composed.build(functools.partial(gmm, **blocks), functools.partial(tgmm, **blocks),
                       activation)
  return ffn(x, group_sizes, w_in, w_out, widths)
