"""varlen_attention on GPU (Pallas lowered through Triton): flash attention with a length-bound loop.

One program per (query block, example, head), in the [b, t, h, d] layout directly. The program
reads its example's length, loops over key blocks only up to the length (and the diagonal when
causal): the trip count is data-dependent, so masked blocks cost nothing. A query block wholly
past the length runs zero iterations and stores zeros. Online softmax with f32 running max,
sum and accumulator in registers.

Blocks: block_q, block_k powers of two >= 16; the head dim is padded to a power of two with
masked loads. Defaults 64 x 32. Capacity: t is the padded length; tokens past lengths[b] are
ignored whatever they hold.
"""
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _common
from pallas_kernels.varlen_attention import reference

_ANY = pl.BlockSpec(memory_space=pl.ANY)


def varlen_attention(q, k, v, lengths, *, causal=False, sm_scale, block_q=64, block_k=32,
                     interpret=False):
  b, t, h, d = q.shape
  bq, bk, dp = _common.gpu_block(t, block_q), _common.gpu_block(t, block_k), _common.next_pow2(
      max(d, 16))
  lengths = jnp.clip(lengths.astype(jnp.int32), 0, t)

  def kernel(len_ref, q_ref, k_ref, v_ref, out_ref):
    qi, bi, hi = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length = len_ref[bi]
    rows = qi * bq + jnp.arange(bq)
    d_ok = jnp.arange(dp) < d
    qs = pltriton.load(q_ref.at[bi, pl.ds(qi * bq, bq), hi, pl.ds(0, dp)],
                       mask=(rows < t)[:, None] & d_ok[None, :], other=0)
    key_end = jnp.minimum(length, (qi + 1) * bq) if causal else length
    key_blocks = jnp.where(qi * bq < length, _common.cdiv(key_end, bk), 0)

    def one_block(j, carry):
      m_prev, l_prev, acc = carry
      cols = j * bk + jnp.arange(bk)
      col_ok = cols < length
      kv_mask = col_ok[:, None] & d_ok[None, :]
      ks = pltriton.load(k_ref.at[bi, pl.ds(j * bk, bk), hi, pl.ds(0, dp)], mask=kv_mask,
                         other=0)
      vs = pltriton.load(v_ref.at[bi, pl.ds(j * bk, bk), hi, pl.ds(0, dp)], mask=kv_mask,
                         other=0)
      s = pltriton.dot(qs, ks, trans_b=True) * sm_scale
      ok = col_ok[None, :] & (cols[None, :] <= rows[:, None] if causal else True)
      s = jnp.where(ok, s, reference.MASK_VALUE)
      m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
      p = jnp.where(ok, jnp.exp(s - m_new[:, None]), 0.0)
      alpha = jnp.exp(m_prev - m_new)
      acc = alpha[:, None] * acc + pltriton.dot(p.astype(vs.dtype), vs)
      return m_new, alpha * l_prev + jnp.sum(p, axis=1), acc

    init = (jnp.full((bq,), reference.MASK_VALUE, jnp.float32), jnp.zeros((bq,), jnp.float32),
            jnp.zeros((bq, dp), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, key_blocks, one_block, init)
    out = jnp.where((rows < length)[:, None], acc / jnp.maximum(l, 1e-30)[:, None], 0.0)
    pltriton.store(out_ref.at[bi, pl.ds(qi * bq, bq), hi, pl.ds(0, dp)], out.astype(out_ref.dtype),
                   mask=(rows < t)[:, None] & d_ok[None, :])

  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      grid=(_common.cdiv(t, bq), b, h),
      in_specs=[_ANY] * 4,
      out_specs=_ANY,
      compiler_params=_common.triton_params(),
      interpret=interpret,
      name="varlen_attention")(lengths, q, k, v)
