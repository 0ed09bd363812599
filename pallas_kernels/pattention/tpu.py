"""pattention on TPU (Pallas + Mosaic): two passes over parameter-token blocks, scores stay in VMEM.

`pattention` (all n parameter tokens on this device). Grid (token blocks, pass, parameter
blocks). Pass 0 computes each score block S = X K_blk^T and accumulates the row sums of
squares; pass 1 normalises each block with the finished row norm, applies GeLU and accumulates
A_blk V_blk into an f32 [block_t, d_out] scratch written once at the end. When the token block's
whole score row fits the score cache (`CACHE_BYTES` of f32), pass 0 keeps the blocks in VMEM and
pass 1 reads them back: X K_P^T is computed once, and K blocks are not fetched in pass 1 (their
index map stays on the last block). Otherwise pass 1 recomputes them (2 t n d_in extra FLOPs).
V blocks are not fetched during pass 0 (their index map stays on block 0). The [t, n] score
matrix never reaches HBM. Parameter tokens past n in the last block are masked out.

`row_norms` and `attend` are the two passes as separate calls, for parameter tokens split over a
mesh axis: the op sums the shards' row_norms (a psum) between them, then sums their attend
outputs (f32 partials).

Blocks (`_blocks`): block_t (multiple of 8, 16 for bf16) x block_n (multiple of 128) score tiles,
the whole of d_in and d_out per block. Defaults 256 x 512, halved (block_n first, down to 128,
then block_t) until the double-buffered x, K, V and output blocks, the f32 accumulator and the
score cache fit `VMEM_BUDGET` (13 MiB: v5e's default scoped VMEM is 16 MiB); e.g. bf16 at
d_in = d_out = 4096 runs 128 x 128 blocks in ~12 MiB with n = 4096 cached. `vmem_limit_bytes` is
set to that estimate plus headroom (at least the 16 MiB default, at most 48 MiB, below v7x's 64
MiB of VMEM), so the largest shapes (d beyond ~6k in bf16 at the smallest blocks) still compile
where the chip has the VMEM. Tiling d_in / d_out inside the kernel is not done. Speed was not
measured (no TPU was available). Nothing overflows: n is fixed by the parameters. GeLU is the
exact one, x (1 + erf(x / sqrt 2)) / 2 (Mosaic lowers lax.erf, not lax.erfc).
"""
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _common
from pallas_kernels.pattention import reference

MIB = 1 << 20
VMEM_BUDGET = 13 * MIB
CACHE_BYTES = 4 * MIB
VMEM_LIMIT = (16 * MIB, 48 * MIB)


def _vmem_bytes(tt, tn, n, d_in, d_out, itemsize, cached):
  blocks = 2 * itemsize * (tt * d_in + tn * d_in + tn * d_out + tt * d_out)  # double-buffered
  scratch = 4 * tt * (d_out + _common.LANES)
  cache = 4 * tt * _common.round_up(n, tn) if cached else 0
  return blocks + scratch + cache


def _blocks(t, n, d_in, d_out, dtype, block_t, block_n):
  """(tt, tn, cached, vmem estimate): the largest blocks <= the requested that fit VMEM_BUDGET."""
  align, itemsize = _common.sublane_align(dtype), jnp.dtype(dtype).itemsize
  tt, tn = _common.tpu_block(t, block_t, align), _common.tpu_block(n, block_n, 128)

  def fits(tt, tn):
    return _vmem_bytes(tt, tn, n, d_in, d_out, itemsize, False) <= VMEM_BUDGET

  while not fits(tt, tn) and tn > 128 and tn % 256 == 0:
    tn //= 2
  while not fits(tt, tn) and tt > align and tt % (2 * align) == 0:
    tt //= 2
  cached = (4 * tt * _common.round_up(n, tn) <= CACHE_BYTES
            and _vmem_bytes(tt, tn, n, d_in, d_out, itemsize, True) <= VMEM_BUDGET)
  return tt, tn, cached, _vmem_bytes(tt, tn, n, d_in, d_out, itemsize, cached)


def _params(semantics, vmem):
  limit = min(max(int(vmem * 1.25) + 2 * MIB, VMEM_LIMIT[0]), VMEM_LIMIT[1])
  return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=limit)


def _scores(x_ref, k_ref, j, tn, n):
  s = jax.lax.dot_general(x_ref[...], k_ref[...], (((1,), (1,)), ((), ())),
                          preferred_element_type=jnp.float32)
  key_ok = j * tn + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1) < n
  return jnp.where(key_ok, s, 0.0)


def _accumulate(a, v_ref, acc_ref, j, tn, n):
  v_ok = j * tn + jax.lax.broadcasted_iota(jnp.int32, v_ref.shape, 0) < n
  v = _common.tpu_select(v_ok, v_ref[...])
  acc_ref[...] += jnp.dot(a.astype(v.dtype), v, preferred_element_type=jnp.float32)


def _interpret(interpret):
  return _common.TPU_INTERPRET if interpret else False


def _cost(t, n, d_in, d_out, dtype, score_passes, attend=True):
  itemsize = jnp.dtype(dtype).itemsize
  flops = 2 * t * n * d_in * score_passes + (2 * t * n * d_out if attend else 0)
  moved = itemsize * (t * d_in + n * d_in + (n * d_out + t * d_out if attend else 0)) + 4 * t
  return _common.cost(flops, moved, transcendentals=t * n if attend else 0)


def pattention(x, k_p, v_p, *, tau, eps=reference.EPS, block_t=256, block_n=512,
               interpret=False):
  t, d_in = x.shape
  n, d_out = v_p.shape
  tt, tn, cached, vmem = _blocks(t, n, d_in, d_out, x.dtype, block_t, block_n)
  n_blocks = _common.cdiv(n, tn)
  x, k_p, v_p = _common.match_varying(x, k_p, v_p)

  def kernel(x_ref, k_ref, v_ref, out_ref, ss_ref, acc_ref, *cache):
    second, j = pl.program_id(1), pl.program_id(2)

    @pl.when(second == 0)
    def _sum_squares():
      s = _scores(x_ref, k_ref, j, tn, n)
      if cached:
        cache[0][j] = s

      @pl.when(j == 0)
      def _zero():
        ss_ref[...] = jnp.zeros_like(ss_ref)

      _common.write_row_stat(ss_ref, _common.read_row_stat(ss_ref)
                             + jnp.sum(s * s, axis=1, keepdims=True))

    @pl.when(second == 1)
    def _attend():
      @pl.when(j == 0)
      def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

      s = cache[0][j] if cached else _scores(x_ref, k_ref, j, tn, n)
      scale = tau * jax.lax.rsqrt(_common.read_row_stat(ss_ref) + eps)
      _accumulate(_common.gelu_exact_mosaic(s * scale), v_ref, acc_ref, j, tn, n)

      @pl.when(j == n_blocks - 1)
      def _store():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)

  # Cached: pass 1 keeps K on the last block pass 0 fetched (no DMA); V stays on block 0 in pass 0.
  k_map = ((lambda i, p, j: (j + p * (n_blocks - 1 - j), 0)) if cached
           else (lambda i, p, j: (j, 0)))
  return pl.pallas_call(
      kernel,
      out_shape=_common.out_struct((t, d_out), x.dtype, x),
      grid=(_common.cdiv(t, tt), 2, n_blocks),
      in_specs=[pl.BlockSpec((tt, d_in), lambda i, p, j: (i, 0)),
                pl.BlockSpec((tn, d_in), k_map),
                pl.BlockSpec((tn, d_out), lambda i, p, j: (j * p, 0))],
      out_specs=pl.BlockSpec((tt, d_out), lambda i, p, j: (i, 0)),
      scratch_shapes=[pltpu.VMEM((tt, _common.LANES), jnp.float32),
                      pltpu.VMEM((tt, d_out), jnp.float32)]
                     + ([pltpu.VMEM((n_blocks, tt, tn), jnp.float32)] if cached else []),
      compiler_params=_params(("parallel", "arbitrary", "arbitrary"), vmem),
      cost_estimate=_cost(t, n, d_in, d_out, x.dtype, 1 if cached else 2),
      interpret=_interpret(interpret),
      name="pattention")(x, k_p, v_p)


def row_norms(x, k_p, *, block_t=256, block_n=512, interpret=False):
  """sum_j S_ij^2 over these keys, f32 [t]."""
  t, d_in = x.shape
  n = k_p.shape[0]
  tt, tn, _, vmem = _blocks(t, n, d_in, 0, x.dtype, block_t, block_n)
  n_blocks = _common.cdiv(n, tn)
  x, k_p = _common.match_varying(x, k_p)

  def kernel(x_ref, k_ref, out_ref, ss_ref):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _zero():
      ss_ref[...] = jnp.zeros_like(ss_ref)

    s = _scores(x_ref, k_ref, j, tn, n)
    _common.write_row_stat(ss_ref, _common.read_row_stat(ss_ref)
                           + jnp.sum(s * s, axis=1, keepdims=True))

    @pl.when(j == n_blocks - 1)
    def _store():
      out_ref[...] = _common.read_row_stat(ss_ref)

  ss = pl.pallas_call(
      kernel,
      out_shape=_common.out_struct((t, 1), jnp.float32, x),
      grid=(_common.cdiv(t, tt), n_blocks),
      in_specs=[pl.BlockSpec((tt, d_in), lambda i, j: (i, 0)),
                pl.BlockSpec((tn, d_in), lambda i, j: (j, 0))],
      out_specs=pl.BlockSpec((tt, 1), lambda i, j: (i, 0)),
      scratch_shapes=[pltpu.VMEM((tt, _common.LANES), jnp.float32)],
      compiler_params=_params(("parallel", "arbitrary"), vmem),
      cost_estimate=_cost(t, n, d_in, 0, x.dtype, 1, attend=False),
      interpret=_interpret(interpret),
      name="pattention_norms")(x, k_p)
  return ss[:, 0]


def attend(x, k_p, v_p, sq_norms, *, tau, eps=reference.EPS, out_dtype=None, block_t=256,
           block_n=512, interpret=False):
  """GeLU(S_i tau / sqrt(sq_norms_i + eps)) V_P over these keys, the norms given."""
  t, d_in = x.shape
  n, d_out = v_p.shape
  tt, tn, _, vmem = _blocks(t, n, d_in, d_out, x.dtype, block_t, block_n)
  n_blocks = _common.cdiv(n, tn)
  x, k_p, v_p, ss = _common.match_varying(x, k_p, v_p, sq_norms.astype(jnp.float32)[:, None])

  def kernel(x_ref, k_ref, v_ref, ss_ref, out_ref, acc_ref):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _zero():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    s = _scores(x_ref, k_ref, j, tn, n)
    scale = tau * jax.lax.rsqrt(ss_ref[...] + eps)
    _accumulate(_common.gelu_exact_mosaic(s * scale), v_ref, acc_ref, j, tn, n)

    @pl.when(j == n_blocks - 1)
    def _store():
      out_ref[...] = acc_ref[...].astype(out_ref.dtype)

  return pl.pallas_call(
      kernel,
      out_shape=_common.out_struct((t, d_out), out_dtype or x.dtype, x),
      grid=(_common.cdiv(t, tt), n_blocks),
      in_specs=[pl.BlockSpec((tt, d_in), lambda i, j: (i, 0)),
                pl.BlockSpec((tn, d_in), lambda i, j: (j, 0)),
                pl.BlockSpec((tn, d_out), lambda i, j: (j, 0)),
                pl.BlockSpec((tt, 1), lambda i, j: (i, 0))],
      out_specs=pl.BlockSpec((tt, d_out), lambda i, j: (i, 0)),
      scratch_shapes=[pltpu.VMEM((tt, d_out), jnp.float32)],
      compiler_params=_params(("parallel", "arbitrary"), vmem),
      cost_estimate=_cost(t, n, d_in, d_out, x.dtype, 1),
      interpret=_interpret(interpret),
      name="pattention_attend")(x, k_p, v_p, ss)
