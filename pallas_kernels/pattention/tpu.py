"""pattention on TPU (Pallas + Mosaic): two passes over parameter-token blocks, scores stay in VMEM.

Grid (token blocks, pass, parameter blocks). Pass 0 computes each score block S = X K_blk^T in
VMEM and accumulates the row sums of squares; pass 1 recomputes the block, normalises it with the
finished row norm, applies GeLU and accumulates A_blk V_blk into an f32 [block_t, d_out] scratch
written once at the end. The [t, n] score matrix never reaches HBM; the price is computing
X K_P^T twice (2 t n d_in extra FLOPs). V blocks are not fetched during pass 0 (their index map
stays on block 0). Parameter tokens past n in the last block are masked out of both passes.

Blocks: block_t (multiple of 8, 16 for bf16) x block_n (multiple of 128) score tiles, the whole
of d_in and d_out in VMEM. Defaults 256 x 512. Nothing overflows: n is fixed by the parameters.
GeLU is the exact one, x (1 + erf(x / sqrt 2)) / 2 (Mosaic lowers lax.erf, not lax.erfc).
"""
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _common
from pallas_kernels.pattention import reference


def pattention(x, k_p, v_p, *, tau, eps=reference.EPS, block_t=256, block_n=512,
               interpret=False):
  t, d_in = x.shape
  n, d_out = v_p.shape
  tt = _common.tpu_block(t, block_t, _common.sublane_align(x.dtype))
  tn = _common.tpu_block(n, block_n, 128)
  n_blocks = _common.cdiv(n, tn)

  def kernel(x_ref, k_ref, v_ref, out_ref, ss_ref, acc_ref):
    second, j = pl.program_id(1), pl.program_id(2)
    s = jax.lax.dot_general(x_ref[...], k_ref[...], (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
    key_ok = j * tn + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1) < n
    s = jnp.where(key_ok, s, 0.0)

    @pl.when((second == 0) & (j == 0))
    def _zero_norms():
      ss_ref[...] = jnp.zeros_like(ss_ref)

    @pl.when(second == 0)
    def _sum_squares():
      _common.write_row_stat(ss_ref, _common.read_row_stat(ss_ref)
                             + jnp.sum(s * s, axis=1, keepdims=True))

    @pl.when((second == 1) & (j == 0))
    def _zero_acc():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(second == 1)
    def _attend():
      scale = tau * jax.lax.rsqrt(_common.read_row_stat(ss_ref) + eps)
      a = _common.gelu_exact_mosaic(s * scale)
      v_ok = j * tn + jax.lax.broadcasted_iota(jnp.int32, v_ref.shape, 0) < n
      v = _common.tpu_select(v_ok, v_ref[...])
      acc_ref[...] += jnp.dot(a.astype(v.dtype), v, preferred_element_type=jnp.float32)

    @pl.when((second == 1) & (j == n_blocks - 1))
    def _store():
      out_ref[...] = acc_ref[...].astype(out_ref.dtype)

  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((t, d_out), x.dtype),
      grid=(_common.cdiv(t, tt), 2, n_blocks),
      in_specs=[pl.BlockSpec((tt, d_in), lambda i, p, j: (i, 0)),
                pl.BlockSpec((tn, d_in), lambda i, p, j: (j, 0)),
                pl.BlockSpec((tn, d_out), lambda i, p, j: (j * p, 0))],
      out_specs=pl.BlockSpec((tt, d_out), lambda i, p, j: (i, 0)),
      scratch_shapes=[pltpu.VMEM((tt, _common.LANES), jnp.float32),
                      pltpu.VMEM((tt, d_out), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      interpret=_common.TPU_INTERPRET if interpret else False,
      name="pattention")(x, k_p, v_p)
