"""routed_ffn on TPU: grouped matmuls in Pallas + Mosaic, driven by a scalar-prefetched schedule.

gmm:  out[r] = lhs[r] @ rhs[g(r)] for rows r in group g; rows in no group get 0.
tgmm: out[g] = lhs[rows of g]^T @ rhs[rows of g].

Schedule. Rows are cut into tiles of `block_m`. A *visit* is one (row tile, group) pair with at
least one row of the group in the tile; visits are listed in row order, so all visits of a tile
(gmm) and all visits of a group (tgmm) are consecutive, and a tile that straddles a group boundary
is visited once per group with the other group's rows masked. The grid has room for the worst
case, cdiv(m, block_m) + E - 1 visits (+ E for tgmm, which also visits each empty group once to
write its zero gradient); steps past the last visit repeat its block indices, so Pallas issues no
DMA and the kernel does no work. The schedule (group, tiles and first/last flags per visit, group
bounds, width limits) lives in SMEM via scalar prefetch, and the BlockSpec index maps read it.

Skipped rows. A row tile whose rows all belong to the skip group (rows past sum(group_sizes))
gets one gmm visit without the ACTIVE flag: it writes zeros from a zeroed accumulator while the
input index maps stay on the last routed block, so the tile is never fetched nor multiplied.
Skip rows inside a tile shared with a routed group are written as zeros.

Masking (as jax's megablox gmm). gmm multiplies whole tiles: the rows of other groups and the
columns past a group's n limit are computed and dropped by the store, which writes only the
visit's group rows (a select on the f32 accumulator once per visit). Only the k tile holding
the group's k limit or the k remainder masks its operands, since past the limit they may hold
anything (padding, NaN). tgmm contracts over rows, so a row tile that straddles a group bound
masks its rows; tiles inside the group multiply unmasked; columns past the limits are dropped
at the store.

Widths. A group's k / n limit (its hidden width) bounds the work: k tiles past the limit are
not fetched or multiplied; n tiles past it are written as zeros without a matmul.

Cost estimates. Both calls give XLA a `pl.CostEstimate`: the matmul flops and bytes of the
bound (every row through one group's full matrix), since the real counts are traced values.

Blocks: block_m rows (multiple of 8, or 16 for bf16), block_k and block_n lanes (multiples of
128), each clamped to the whole dimension when that is smaller. Defaults 128 x 512 x 512: in
bf16 with double buffering about 2 MiB of VMEM for gmm and 3 MiB for tgmm (its f32 accumulator
is block_k x block_n). Accumulation is in f32. There is no capacity: every row of every group
is computed, nothing overflows.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _common
from pallas_kernels.routed_ffn import composed
from pallas_kernels.routed_ffn import reference

ACTIVE, FIRST, LAST = 1, 2, 4  # bits of a visit's flags word


def schedule(group_sizes, m: int, tm: int, *, for_tgmm: bool):
  """The visit list (see module docstring) as int32 arrays.

  Returns (group, in_tile, out_tile, flags), each of length cdiv(m, tm) + E - 1 (+ E for
  tgmm). in_tile is the row tile to read, out_tile the one to write (gmm: they differ on
  skip-tile visits, which write zeros while the inputs stay on the last routed block).
  ACTIVE marks visits that multiply; FIRST / LAST the first / last visit of an output tile
  (gmm) or of a group (tgmm). Steps past the end repeat the last visit with no flag set.
  """
  e = group_sizes.shape[0]
  tiles = _common.cdiv(m, tm)
  starts, ends = reference.group_bounds(group_sizes, m)
  nonempty = ends > starts
  first_tile = jnp.minimum(starts // tm, tiles - 1)
  last_tile = (jnp.maximum(ends, starts + 1) - 1) // tm
  counts = jnp.where(nonempty, last_tile - first_tile + 1, 1 if for_tgmm else 0)
  cum = jnp.cumsum(counts)
  num_routed = cum[-1]
  first_skip_tile = _common.cdiv(ends[-1], tm)
  num_skip = 0 if for_tgmm else tiles - first_skip_tile
  v = jnp.arange(tiles + e - 1 + (e if for_tgmm else 0), dtype=jnp.int32)
  v_routed = jnp.clip(v, 0, jnp.maximum(num_routed - 1, 0))
  group = jnp.minimum(jnp.searchsorted(cum, v_routed, side="right"), e - 1)
  in_tile = jnp.minimum(first_tile[group] + v_routed - (cum - counts)[group], tiles - 1)
  routed = v < num_routed
  skip = ~routed & (v < num_routed + num_skip)
  idle_tile = jnp.where(num_skip > 0, tiles - 1, in_tile)
  out_tile = jnp.where(routed, in_tile, jnp.where(skip, first_skip_tile + v - num_routed,
                                                  idle_tile))
  key = group if for_tgmm else out_tile
  valid = routed | skip
  num_valid = num_routed + num_skip
  first = valid & ((v == 0) | (key != jnp.roll(key, 1)))
  last = valid & ((v == num_valid - 1) | (key != jnp.roll(key, -1)))
  flags = routed * ACTIVE + first * FIRST + last * LAST
  return tuple(a.astype(jnp.int32) for a in (group, in_tile, out_tile, flags))


def _limits(limit, e, size):
  """Per-group limit clipped to the dimension: masks built from it must also exclude the
  padding of a partial last block."""
  return jnp.full((e,), size, jnp.int32) if limit is None else jnp.minimum(
      limit.astype(jnp.int32), size)


def _last_block(limit, t):
  """Index of the last block that holds part of [0, limit), 0 when the limit is 0."""
  return jnp.maximum(_common.cdiv(limit, t) - 1, 0)


def _iota(shape, dim):
  return jax.lax.broadcasted_iota(jnp.int32, shape, dim)


def gmm(lhs, rhs, group_sizes, *, k_limit=None, n_limit=None, transpose_rhs=False,
        block_m=128, block_k=512, block_n=512, interpret=False):
  """Grouped matmul lhs [m, K] x rhs [E, K, N] (or [E, N, K] transposed) -> [m, N]."""
  m, k = lhs.shape
  e = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  tm = _common.tpu_block(m, block_m, _common.sublane_align(lhs.dtype))
  tk = _common.tpu_block(k, block_k, 128)
  tn = _common.tpu_block(n, block_n, 128)
  k_grid, n_grid = _common.cdiv(k, tk), _common.cdiv(n, tn)
  group, in_tile, out_tile, flags = schedule(group_sizes, m, tm, for_tgmm=False)
  starts, ends = reference.group_bounds(group_sizes, m)
  k_limit, n_limit = _limits(k_limit, e, k), _limits(n_limit, e, n)
  *prefetch, lhs, rhs = composed.match_varying(group, in_tile, out_tile, flags, starts, ends,
                                               k_limit, n_limit, lhs, rhs)

  def k_block(kk, v, g, flags_ref, k_lim_ref):
    # Past a group's k limit, and on visits that do not multiply, stay on the last block
    # fetched so that no DMA is issued.
    last = _last_block(k_lim_ref[g], tk)
    return jnp.where((flags_ref[v] & ACTIVE) != 0, jnp.minimum(kk, last), last)

  def lhs_map(nn, v, kk, group_ref, in_ref, out_ref, flags_ref, s_ref, e_ref, k_lim_ref, _):
    return in_ref[v], k_block(kk, v, group_ref[v], flags_ref, k_lim_ref)

  def rhs_map(nn, v, kk, group_ref, in_ref, out_ref, flags_ref, s_ref, e_ref, k_lim_ref,
              n_lim_ref):
    g = group_ref[v]
    kb = k_block(kk, v, g, flags_ref, k_lim_ref)
    nb = jnp.minimum(nn, _last_block(n_lim_ref[g], tn))
    return (g, nb, kb) if transpose_rhs else (g, kb, nb)

  def out_map(nn, v, kk, group_ref, in_ref, out_ref, *_):
    return out_ref[v], nn

  dims = (((1,), (1 if transpose_rhs else 0,)), ((), ()))

  def kernel(group_ref, in_ref, out_tile_ref, flags_ref, s_ref, e_ref, k_lim_ref, n_lim_ref,
             lhs_ref, rhs_ref, out_ref, acc_ref):
    nn, v, kk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    g, fl = group_ref[v], flags_ref[v]
    k_lim, n_lim = k_lim_ref[g], n_lim_ref[g]
    multiplies = ((fl & ACTIVE) != 0) & (kk * tk < k_lim) & (nn * tn < n_lim)
    # Only the k tile holding the group's k limit (or the k remainder) reads past it: lhs and
    # rhs are masked there alone. Rows of other groups and columns past n_lim are multiplied
    # unmasked and dropped at the store.
    k_edge = (kk + 1) * tk > k_lim

    @pl.when(kk == 0)
    def _zero():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(multiplies & ~k_edge)
    def _accumulate():
      acc_ref[...] += jax.lax.dot_general(lhs_ref[...], rhs_ref[...], dims,
                                          preferred_element_type=jnp.float32)

    @pl.when(multiplies & k_edge)
    def _accumulate_k_edge():
      k_dim = dims[0][1][0]
      x = _common.tpu_select(kk * tk + _iota(lhs_ref.shape, 1) < k_lim, lhs_ref[...])
      w = _common.tpu_select(kk * tk + _iota(rhs_ref.shape, k_dim) < k_lim, rhs_ref[...])
      acc_ref[...] += jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)

    @pl.when((kk == k_grid - 1) & (fl != 0))
    def _store():
      # Each visit writes its group's rows of the tile; the first visit of a tile also zeroes
      # the rest (skip rows, and every row of an all-skipped tile's visit).
      rows = out_tile_ref[v] * tm + _iota((tm, tn), 0)
      cols = nn * tn + _iota((tm, tn), 1)
      keep = ((fl & ACTIVE) != 0) & (rows >= s_ref[g]) & (rows < e_ref[g]) & (cols < n_lim)
      base = jnp.where((fl & FIRST) != 0, 0.0, out_ref[...].astype(jnp.float32))
      out_ref[...] = jnp.where(keep, acc_ref[...], base).astype(out_ref.dtype)

  rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
  return pl.pallas_call(
      kernel,
      out_shape=composed.out_struct((m, n), lhs.dtype, lhs),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(prefetch),
          grid=(n_grid, group.shape[0], k_grid),
          in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
          out_specs=pl.BlockSpec((tm, tn), out_map),
          scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      cost_estimate=reference.gmm_cost(lhs, rhs, n),
      interpret=_common.TPU_INTERPRET if interpret else False,
      name="routed_gmm")(*prefetch, lhs, rhs)


def tgmm(lhs, rhs, group_sizes, *, a_limit=None, b_limit=None, out_dtype=None,
         block_m=128, block_k=512, block_n=512, interpret=False):
  """Per-group lhs^T rhs: lhs [m, A], rhs [m, B] -> [E, A, B]; A tiled by block_k, B by block_n."""
  m, a = lhs.shape
  b = rhs.shape[1]
  e = group_sizes.shape[0]
  tm = _common.tpu_block(m, block_m, max(_common.sublane_align(lhs.dtype),
                                         _common.sublane_align(rhs.dtype)))
  ta = _common.tpu_block(a, block_k, 128)
  tb = _common.tpu_block(b, block_n, 128)
  group, tile, _, flags = schedule(group_sizes, m, tm, for_tgmm=True)
  starts, ends = reference.group_bounds(group_sizes, m)
  a_limit, b_limit = _limits(a_limit, e, a), _limits(b_limit, e, b)
  *prefetch, lhs, rhs = composed.match_varying(group, tile, flags, starts, ends, a_limit,
                                               b_limit, lhs, rhs)

  def lhs_map(ai, bi, v, group_ref, tile_ref, *_):
    return tile_ref[v], ai

  def rhs_map(ai, bi, v, group_ref, tile_ref, *_):
    return tile_ref[v], bi

  def out_map(ai, bi, v, group_ref, *_):
    return group_ref[v], ai, bi

  def kernel(group_ref, tile_ref, flags_ref, s_ref, e_ref, a_lim_ref, b_lim_ref,
             lhs_ref, rhs_ref, out_ref, acc_ref):
    ai, bi, v = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    g, fl = group_ref[v], flags_ref[v]
    a_lim, b_lim = a_lim_ref[g], b_lim_ref[g]
    start, end = s_ref[g], e_ref[g]
    first_row = tile_ref[v] * tm

    @pl.when((fl & FIRST) != 0)
    def _zero():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    multiplies = (((fl & ACTIVE) != 0) & (end > start)
                  & (ai * ta < a_lim) & (bi * tb < b_lim))
    # The rows are the contraction: only a tile that straddles the group's bounds masks them.
    inside = (first_row >= start) & (first_row + tm <= end)
    contract = (((0,), (0,)), ((), ()))

    @pl.when(multiplies & inside)
    def _accumulate():
      acc_ref[...] += jax.lax.dot_general(lhs_ref[...], rhs_ref[...], contract,
                                          preferred_element_type=jnp.float32)

    @pl.when(multiplies & ~inside)
    def _accumulate_edge():
      def rows_of_group(ref):
        rows = first_row + _iota(ref.shape, 0)
        return _common.tpu_select((rows >= start) & (rows < end), ref[...])

      acc_ref[...] += jax.lax.dot_general(rows_of_group(lhs_ref), rows_of_group(rhs_ref),
                                          contract, preferred_element_type=jnp.float32)

    @pl.when((fl & LAST) != 0)
    def _store():
      keep = ((ai * ta + _iota((ta, tb), 0) < a_lim)
              & (bi * tb + _iota((ta, tb), 1) < b_lim))
      out_ref[...] = jnp.where(keep, acc_ref[...], 0.0).astype(out_ref.dtype)

  return pl.pallas_call(
      kernel,
      out_shape=composed.out_struct((e, a, b), out_dtype or lhs.dtype, lhs),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(prefetch),
          grid=(_common.cdiv(a, ta), _common.cdiv(b, tb), group.shape[0]),
          in_specs=[pl.BlockSpec((tm, ta), lhs_map), pl.BlockSpec((tm, tb), rhs_map)],
          out_specs=pl.BlockSpec((None, ta, tb), out_map),
          scratch_shapes=[pltpu.VMEM((ta, tb), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      cost_estimate=reference.tgmm_cost(lhs, rhs, e, out_dtype or lhs.dtype),
      interpret=_common.TPU_INTERPRET if interpret else False,
      name="routed_tgmm")(*prefetch, lhs, rhs)


def routed_ffn(x, group_sizes, w_in, w_out, widths, *, activation="gelu", block_m=128,
               block_k=512, block_n=512, interpret=False):
  """The routed FFN (see reference.py) from these kernels, with a kernel backward pass."""
  blocks = dict(block_m=block_m, block_k=block_k, block_n=block_n, interpret=interpret)
  ffn = composed.build(functools.partial(gmm, **blocks), functools.partial(tgmm, **blocks),
                       activation)
  return ffn(x, group_sizes, w_in, w_out, widths)
