"""varlen_attention on TPU (Pallas + Mosaic): flash attention whose key loop stops at the length.

q, k, v are transposed to [b, h, t, d] (one XLA transpose each) so that a block is a
[block, d] tile. Grid (b, h, query blocks, key blocks), lengths scalar-prefetched. A key block
wholly past the length (or past the diagonal when causal) is neither fetched (its index map
stays on the last useful block) nor computed; a query block wholly past the length computes
nothing and writes zeros. Online softmax with f32 running max, sum and accumulator in VMEM.

Blocks: block_q, block_k (multiples of 8, 16 for bf16; lane-dense when multiples of 128), the
whole head dim. Defaults 128 x 128. Capacity: t is the padded length; tokens past lengths[b]
are ignored whatever they hold.
"""
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _common
from pallas_kernels.varlen_attention import reference


def varlen_attention(q, k, v, lengths, *, causal=False, sm_scale, block_q=128, block_k=128,
                     interpret=False):
  b, t, h, d = q.shape
  align = _common.sublane_align(q.dtype)
  tq, tk = _common.tpu_block(t, block_q, align), _common.tpu_block(t, block_k, align)
  q_blocks, k_blocks = _common.cdiv(t, tq), _common.cdiv(t, tk)
  lengths = jnp.clip(lengths.astype(jnp.int32), 0, t)

  def key_end(qi, length):
    return jnp.minimum(length, (qi + 1) * tq) if causal else length

  def last_block(end, size):
    return jnp.maximum(_common.cdiv(end, size) - 1, 0)

  def q_map(bi, hi, qi, ki, len_ref):
    return bi, hi, jnp.minimum(qi, last_block(len_ref[bi], tq)), 0

  def kv_map(bi, hi, qi, ki, len_ref):
    length = len_ref[bi]
    last_q = last_block(length, tq)
    useful = jnp.minimum(ki, last_block(key_end(qi, length), tk))
    # Query blocks past the length stay on the block the last useful step fetched: no DMA.
    return bi, hi, jnp.where(qi * tq < length, useful,
                             last_block(key_end(last_q, length), tk)), 0

  def kernel(len_ref, q_ref, k_ref, v_ref, out_ref, m_ref, l_ref, acc_ref):
    bi, qi, ki = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    length = len_ref[bi]

    @pl.when(ki == 0)
    def _init():
      m_ref[...] = jnp.full_like(m_ref, reference.MASK_VALUE)
      l_ref[...] = jnp.zeros_like(l_ref)
      acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when((qi * tq < length) & (ki * tk < key_end(qi, length)))
    def _accumulate():
      s = jax.lax.dot_general(q_ref[...], k_ref[...], (((1,), (1,)), ((), ())),
                              preferred_element_type=jnp.float32) * sm_scale
      rows = qi * tq + jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
      cols = ki * tk + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
      ok = cols < length
      if causal:
        ok = ok & (cols <= rows)
      s = jnp.where(ok, s, reference.MASK_VALUE)
      m_prev = _common.read_row_stat(m_ref)
      m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
      p = jnp.where(ok, jnp.exp(s - m_new), 0.0)
      alpha = jnp.exp(m_prev - m_new)
      _common.write_row_stat(
          l_ref, alpha * _common.read_row_stat(l_ref) + jnp.sum(p, axis=1, keepdims=True))
      key_rows = ki * tk + jax.lax.broadcasted_iota(jnp.int32, v_ref.shape, 0)
      vb = _common.tpu_select(key_rows < length, v_ref[...])
      acc_ref[...] = alpha * acc_ref[...] + jnp.dot(p.astype(vb.dtype), vb,
                                                    preferred_element_type=jnp.float32)
      _common.write_row_stat(m_ref, m_new)

    @pl.when(ki == k_blocks - 1)
    def _store():
      rows = qi * tq + jax.lax.broadcasted_iota(jnp.int32, acc_ref.shape, 0)
      l = jnp.maximum(_common.read_row_stat(l_ref), 1e-30)
      out_ref[...] = jnp.where(rows < length, acc_ref[...] / l, 0.0).astype(out_ref.dtype)

  to_bhtd = lambda a: jnp.swapaxes(a, 1, 2)
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((b, h, t, d), q.dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(b, h, q_blocks, k_blocks),
          in_specs=[pl.BlockSpec((None, None, tq, d), q_map),
                    pl.BlockSpec((None, None, tk, d), kv_map),
                    pl.BlockSpec((None, None, tk, d), kv_map)],
          out_specs=pl.BlockSpec((None, None, tq, d), lambda bi, hi, qi, ki, _: (bi, hi, qi, 0)),
          scratch_shapes=[pltpu.VMEM((tq, _common.LANES), jnp.float32),
                          pltpu.VMEM((tq, _common.LANES), jnp.float32),
                          pltpu.VMEM((tq, d), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=_common.TPU_INTERPRET if interpret else False,
      name="varlen_attention")(lengths, to_bhtd(q), to_bhtd(k), to_bhtd(v))
  return to_bhtd(out)
