"""pattention on GPU (Pallas lowered through Triton): a norm pass, then a fused attend pass.

`row_norms`, one program per block_t tokens: loops over parameter blocks (and d_in in block_d
chunks), computing score blocks in registers and accumulating row sums of squares; it writes
only the [t] f32 norms. `attend`, one program per (block_t tokens, block_out output columns):
recomputes each score block, normalises it with the row norm, applies GeLU and accumulates
A_blk V_blk in f32. The [t, n] score matrix never reaches HBM. `pattention` is the two calls.
With parameter tokens split over a mesh axis the op sums the shards' norms between them.

Every output column block recomputes the scores, so X K_P^T costs 1 + ceil(d_out / block_out)
times its FLOPs; `_blocks` therefore makes block_out as wide as the accumulator allows: block_out
= d_out up to 1024 columns (power of two), with block_t 16 beyond 512 columns so the f32
accumulator stays at <= 16k elements (64 per thread at 8 warps). At d_out = 768 the scores are
computed twice in all (the norm pass and one attend pass) where 64-wide blocks computed them 13
times. Other blocks: block_n 64, block_d per `_common.triton_tiles`' depth rule (64 from d_in
128 for 2-byte inputs). Powers of two >= 16, loads masked. Speed was not measured (no GPU was
available). Nothing overflows: n is fixed by the parameters. GeLU is the exact one, through
`_common.erfc_f32` (exp and arithmetic only: Triton lowers no erf).
"""
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _common
from pallas_kernels.pattention import reference

_ANY = pl.BlockSpec(memory_space=pl.ANY)
MAX_ACCUMULATOR = 16 * 1024
MAX_BLOCK_OUT = 1024


def _blocks(t, n, d_in, d_out, dtype, block_t, block_n, block_d, block_out):
  bo = _common.gpu_block(d_out, block_out or MAX_BLOCK_OUT)
  bt = _common.gpu_block(t, block_t or max(16, min(64, MAX_ACCUMULATOR // bo)))
  bn = _common.gpu_block(n, block_n or 64)
  bd = _common.gpu_block(d_in, block_d) if block_d else _common.triton_tiles(t, n, d_in, dtype)[2]
  return bt, bn, bd, bo


def _score_block(x_ref, k_ref, i, j, bt, bn, bd, t, n, d_in):
  """S for tokens block i and parameter block j, f32 [bt, bn], zero outside [t, n]."""
  row_ok = i * bt + jnp.arange(bt) < t
  key_ok = j * bn + jnp.arange(bn) < n

  def one_chunk(c, s):
    d_ok = c * bd + jnp.arange(bd) < d_in
    xs = pltriton.load(x_ref.at[pl.ds(i * bt, bt), pl.ds(c * bd, bd)],
                       mask=row_ok[:, None] & d_ok[None, :], other=0)
    ks = pltriton.load(k_ref.at[pl.ds(j * bn, bn), pl.ds(c * bd, bd)],
                       mask=key_ok[:, None] & d_ok[None, :], other=0)
    return s + pltriton.dot(xs, ks, trans_b=True)

  return jax.lax.fori_loop(0, _common.cdiv(d_in, bd), one_chunk, jnp.zeros((bt, bn), jnp.float32))


def row_norms(x, k_p, *, block_t=None, block_n=None, block_d=None, interpret=False):
  """sum_j S_ij^2 over these keys, f32 [t]."""
  t, d_in = x.shape
  n = k_p.shape[0]
  bt, bn, bd, _ = _blocks(t, n, d_in, 16, x.dtype, block_t or 32, block_n, block_d, None)
  n_blocks = _common.cdiv(n, bn)
  x, k_p = _common.match_varying(x, k_p)

  def kernel(x_ref, k_ref, ss_ref):
    i = pl.program_id(0)

    def one_block(j, ss):
      s = _score_block(x_ref, k_ref, i, j, bt, bn, bd, t, n, d_in)
      return ss + jnp.sum(s * s, axis=1)

    ss = jax.lax.fori_loop(0, n_blocks, one_block, jnp.zeros((bt,), jnp.float32))
    pltriton.store(ss_ref.at[pl.ds(i * bt, bt)], ss, mask=i * bt + jnp.arange(bt) < t)

  itemsize = jnp.dtype(x.dtype).itemsize
  return pl.pallas_call(
      kernel, out_shape=_common.out_struct((t,), jnp.float32, x),
      grid=(_common.cdiv(t, bt),), in_specs=[_ANY] * 2, out_specs=_ANY,
      compiler_params=_common.triton_params(),
      cost_estimate=_common.cost(2 * t * n * d_in,
                                 itemsize * (t * d_in + _common.cdiv(t, bt) * n * d_in) + 4 * t),
      interpret=interpret, name="pattention_norms")(x, k_p)


def attend(x, k_p, v_p, sq_norms, *, tau, eps=reference.EPS, out_dtype=None, block_t=None,
           block_n=None, block_d=None, block_out=None, interpret=False):
  """GeLU(S_i tau / sqrt(sq_norms_i + eps)) V_P over these keys, the norms given."""
  t, d_in = x.shape
  n, d_out = v_p.shape
  bt, bn, bd, bo = _blocks(t, n, d_in, d_out, x.dtype, block_t, block_n, block_d, block_out)
  n_blocks = _common.cdiv(n, bn)
  x, k_p, v_p, ss = _common.match_varying(x, k_p, v_p, sq_norms.astype(jnp.float32))

  def kernel(x_ref, k_ref, v_ref, ss_ref, out_ref):
    i, o = pl.program_id(0), pl.program_id(1)
    row_ok = i * bt + jnp.arange(bt) < t
    col_ok = o * bo + jnp.arange(bo) < d_out
    ss = pltriton.load(ss_ref.at[pl.ds(i * bt, bt)], mask=row_ok, other=0)
    scale = tau * jax.lax.rsqrt(ss + eps)

    def one_block(j, acc):
      s = _score_block(x_ref, k_ref, i, j, bt, bn, bd, t, n, d_in)
      a = _common.gelu_exact_triton(s * scale[:, None])
      key_ok = j * bn + jnp.arange(bn) < n
      v = pltriton.load(v_ref.at[pl.ds(j * bn, bn), pl.ds(o * bo, bo)],
                        mask=key_ok[:, None] & col_ok[None, :], other=0)
      return acc + pltriton.dot(a.astype(v.dtype), v)

    acc = jax.lax.fori_loop(0, n_blocks, one_block, jnp.zeros((bt, bo), jnp.float32))
    pltriton.store(out_ref.at[pl.ds(i * bt, bt), pl.ds(o * bo, bo)], acc.astype(out_ref.dtype),
                   mask=row_ok[:, None] & col_ok[None, :])

  t_blocks, o_blocks = _common.cdiv(t, bt), _common.cdiv(d_out, bo)
  itemsize = jnp.dtype(x.dtype).itemsize
  return pl.pallas_call(
      kernel, out_shape=_common.out_struct((t, d_out), out_dtype or x.dtype, x),
      grid=(t_blocks, o_blocks), in_specs=[_ANY] * 4, out_specs=_ANY,
      compiler_params=_common.triton_params(num_warps=8 if bt * bo >= 8192 else 4),
      cost_estimate=_common.cost(
          2 * t * n * (d_in * o_blocks + d_out),
          itemsize * (t * d_in + t_blocks * n * (d_in + d_out) + t * d_out) + 4 * t,
          transcendentals=t * n * o_blocks),
      interpret=interpret, name="pattention_attend")(x, k_p, v_p, ss)


def pattention(x, k_p, v_p, *, tau, eps=reference.EPS, block_t=None, block_n=None, block_d=None,
               block_out=None, interpret=False):
  blocks = dict(block_t=block_t, block_n=block_n, block_d=block_d)
  ss = row_norms(x, k_p, interpret=interpret, **blocks)
  return attend(x, k_p, v_p, ss, tau=tau, eps=eps, block_out=block_out, interpret=interpret,
                **blocks)
