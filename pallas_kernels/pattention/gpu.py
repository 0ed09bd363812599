"""pattention on GPU (Pallas lowered through Triton): a norm pass, then a fused attend pass.

Kernel 1, one program per block_t tokens: loops over parameter blocks (and d_in in block_d
chunks), computing score blocks in registers and accumulating row sums of squares; it writes
only the [t] f32 norms. Kernel 2, one program per (block_t tokens, block_out output columns):
recomputes each score block, normalises it with the row norm, applies GeLU and accumulates
A_blk V_blk in f32. The [t, n] score matrix never reaches HBM. Each output column block
recomputes the scores, so X K_P^T costs (1 + d_out / block_out) times its FLOPs: a wider block_out
trades registers for less recomputation.

Blocks are powers of two >= 16, loads masked; defaults block_t 32, block_n 64, block_d 32,
block_out 64. Nothing overflows: n is fixed by the parameters. GeLU is the exact one, through
`_common.erfc_f32` (exp and arithmetic only: Triton lowers no erf).
"""
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _common
from pallas_kernels.pattention import reference

_ANY = pl.BlockSpec(memory_space=pl.ANY)


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


def pattention(x, k_p, v_p, *, tau, eps=reference.EPS, block_t=32, block_n=64, block_d=32,
               block_out=64, interpret=False):
  t, d_in = x.shape
  n, d_out = v_p.shape
  bt, bn, bd, bo = (_common.gpu_block(t, block_t), _common.gpu_block(n, block_n),
                    _common.gpu_block(d_in, block_d), _common.gpu_block(d_out, block_out))
  n_blocks = _common.cdiv(n, bn)

  def norms_kernel(x_ref, k_ref, ss_ref):
    i = pl.program_id(0)

    def one_block(j, ss):
      s = _score_block(x_ref, k_ref, i, j, bt, bn, bd, t, n, d_in)
      return ss + jnp.sum(s * s, axis=1)

    ss = jax.lax.fori_loop(0, n_blocks, one_block, jnp.zeros((bt,), jnp.float32))
    pltriton.store(ss_ref.at[pl.ds(i * bt, bt)], ss, mask=i * bt + jnp.arange(bt) < t)

  def attend_kernel(x_ref, k_ref, v_ref, ss_ref, out_ref):
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

  t_blocks = _common.cdiv(t, bt)
  ss = pl.pallas_call(
      norms_kernel, out_shape=jax.ShapeDtypeStruct((t,), jnp.float32), grid=(t_blocks,),
      in_specs=[_ANY] * 2, out_specs=_ANY, compiler_params=_common.triton_params(),
      interpret=interpret, name="pattention_norms")(x, k_p)
  return pl.pallas_call(
      attend_kernel, out_shape=jax.ShapeDtypeStruct((t, d_out), x.dtype),
      grid=(t_blocks, _common.cdiv(d_out, bo)), in_specs=[_ANY] * 4, out_specs=_ANY,
      compiler_params=_common.triton_params(), interpret=interpret,
      name="pattention_attend")(x, k_p, v_p, ss)
