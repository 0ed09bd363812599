"""The interpreters the kernel tests rely on poison unwritten output, and the shared VJP glue."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _common


def _writes_top_half(x, interpret):
  """A deliberately incomplete kernel: each (16, 128) output block gets only its top 8 rows."""
  def kernel(x_ref, o_ref):
    o_ref[:8, :] = x_ref[:8, :]

  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(x.shape[0] // 16,),
      in_specs=[pl.BlockSpec((16, 128), lambda i: (i, 0))],
      out_specs=pl.BlockSpec((16, 128), lambda i: (i, 0)), interpret=interpret)(x)


def test_tpu_interpreter_fills_unwritten_parts_of_output_blocks_with_nan():
  out = np.asarray(_writes_top_half(jnp.ones((32, 128)), _common.TPU_INTERPRET))
  rows = np.arange(32) % 16 < 8
  assert (out[rows] == 1).all() and np.isnan(out[~rows]).all()


def test_gpu_interpreter_fills_unwritten_output_with_nan():
  def kernel(x_ref, o_ref):
    pltriton.store(o_ref.at[pl.ds(0, 16)], pltriton.load(x_ref.at[pl.ds(0, 16)]))

  out = np.asarray(pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((32,), jnp.float32),
      in_specs=[pl.BlockSpec(memory_space=pl.ANY)], out_specs=pl.BlockSpec(memory_space=pl.ANY),
      compiler_params=_common.triton_params(), interpret=True)(jnp.ones((32,))))
  assert (out[:16] == 1).all() and np.isnan(out[16:]).all()


def test_reference_vjp_gives_reference_gradients_and_none_for_integer_args():
  kernel = lambda x, i: x[i] * 3.0 + 1e-3  # a forward that differs from the reference
  op = _common.with_reference_vjp(kernel, lambda x, i: x[i] * 2.0, diff_argnums=(0,))
  x = jnp.arange(4.0)
  grad = jax.grad(lambda x: op(x, jnp.array([1, 3])).sum())(x)
  np.testing.assert_array_equal(grad, [0.0, 2.0, 0.0, 2.0])


def test_cdiv_of_traced_values_avoids_floor_division():
  jaxpr = str(jax.make_jaxpr(lambda a: _common.cdiv(a, 8))(jnp.int32(17)))
  assert "sign" not in jaxpr and int(_common.cdiv(jnp.int32(17), 8)) == 3
