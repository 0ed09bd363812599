"""gather_matmul and scatter: the TPU and GPU kernels, interpreted on CPU, against the reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.gather_matmul import reference
from tests.pallas_kernels import util

# 19 distinct rows of 50, blocks of 16 rows and 128 columns: nothing divides evenly.
M, D, N, K = 50, 136, 200, 19
BLOCKS = dict(block_rows=16, block_n=128)
INTERPRET = pytest.mark.parametrize("impl", util.INTERPRETERS)
DTYPES = pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])


def _idx(seed=0):
  return jax.random.permutation(jax.random.key(seed), M)[:K].astype(jnp.int32)


@INTERPRET
@DTYPES
def test_gather_matmul_matches_reference(impl, dtype):
  k = util.keys(0, 2)
  x, w = util.normal(k[0], (M, D), dtype), util.normal(k[1], (D, N), dtype, D ** -0.5)
  out = util.jit_call(pallas_kernels.gather_matmul, x, _idx(), w, impl=impl, **BLOCKS)
  util.assert_matches(out, util.jit_call(reference.gather_matmul, x, _idx(), w))


@INTERPRET
def test_gather_matmul_gradients_are_the_scattered_and_gathered_products(impl):
  k = util.keys(1, 3)
  x, w = util.normal(k[0], (M, D)), util.normal(k[1], (D, N))
  cotangent = util.normal(k[2], (K, N))
  dx, dw = jax.jit(jax.grad(lambda x, w: jnp.sum(
      pallas_kernels.gather_matmul(x, _idx(), w, impl=impl, **BLOCKS) * cotangent),
                            argnums=(0, 1)))(x, w)
  # By hand, for y = x[idx] w: dL/dx[idx_r] = g_r w^T (other rows 0), dL/dw = x[idx]^T g.
  x64, w64, g64 = (np.asarray(a, np.float64) for a in (x, w, cotangent))
  idx = np.asarray(_idx())
  want_dx = np.zeros((M, D))
  np.add.at(want_dx, idx, g64 @ w64.T)
  np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5 * np.abs(want_dx).max())
  np.testing.assert_allclose(dw, x64[idx].T @ g64, rtol=1e-5, atol=1e-5 * np.abs(dw).max())


@INTERPRET
@DTYPES
@pytest.mark.parametrize("mode", ["add", "set"])
def test_scatter_writes_only_the_indexed_rows(impl, dtype, mode):
  k = util.keys(2, 2)
  y, out = util.normal(k[0], (K, N), dtype), util.normal(k[1], (M, N), dtype)
  got = util.jit_call(pallas_kernels.scatter, y, _idx(), out, mode=mode, impl=impl, **BLOCKS)
  util.assert_matches(got, util.jit_call(reference.scatter, y, _idx(), out, mode=mode))
  untouched = np.setdiff1d(np.arange(M), np.asarray(_idx()))
  np.testing.assert_array_equal(np.asarray(got[untouched], np.float32),
                                np.asarray(out[untouched], np.float32))


@INTERPRET
def test_zero_capacity_stages_no_kernel_and_one_row_runs_the_kernel(impl):
  k = util.keys(4, 3)
  x, w, out = util.normal(k[0], (M, D)), util.normal(k[1], (D, N)), util.normal(k[2], (M, N))
  none, one = jnp.zeros((0,), jnp.int32), jnp.array([7], jnp.int32)
  # No kernel has an empty grid: the wrappers return without staging one ...
  gather = lambda i: lambda x, w: pallas_kernels.gather_matmul(x, i, w, impl=impl)
  scatter = lambda i: lambda y, out: pallas_kernels.scatter(y, i, out, impl=impl)
  assert "pallas_call" not in str(jax.make_jaxpr(gather(none))(x, w))
  assert "pallas_call" not in str(jax.make_jaxpr(scatter(none))(jnp.zeros((0, N)), out))
  assert gather(none)(x, w).shape == (0, N)
  np.testing.assert_array_equal(scatter(none)(jnp.zeros((0, N)), out), out)
  dx, dw = jax.grad(lambda x, w: jnp.sum(gather(none)(x, w)), argnums=(0, 1))(x, w)
  assert not np.any(dx) and not np.any(dw)
  # ... while the smallest non-empty capacity reaches the kernel and computes x[7] w.
  assert "pallas_call" in str(jax.make_jaxpr(gather(one))(x, w))
  np.testing.assert_allclose(jax.jit(gather(one))(x, w)[0],
                             np.asarray(x, np.float64)[7] @ np.asarray(w, np.float64),
                             rtol=1e-5, atol=1e-5)
  y = util.normal(k[0], (1, N))
  want = np.asarray(out).copy()
  want[7] += np.asarray(y)[0]
  np.testing.assert_allclose(jax.jit(scatter(one))(y, out), want, rtol=1e-6, atol=1e-6)


def test_scatter_add_reference_adds_and_set_overwrites():
  out = jnp.ones((4, 2))
  y = jnp.array([[2.0, 3.0], [4.0, 5.0]])
  idx = jnp.array([2, 0])
  np.testing.assert_array_equal(reference.scatter(y, idx, out, mode="add"),
                                [[5, 6], [1, 1], [3, 4], [1, 1]])
  np.testing.assert_array_equal(reference.scatter(y, idx, out, mode="set"),
                                [[4, 5], [1, 1], [2, 3], [1, 1]])


def test_scatter_rejects_unknown_mode():
  with pytest.raises(ValueError, match="mode"):
    pallas_kernels.scatter(jnp.ones((2, 2)), jnp.arange(2), jnp.ones((4, 2)), mode="max")


@INTERPRET
@pytest.mark.parametrize("mode", ["add", "set"])
def test_scatter_gradients_gather_the_cotangent_rows_and_pass_or_zero_the_rest(impl, mode):
  k = util.keys(5, 3)
  y, out, g = util.normal(k[0], (K, N)), util.normal(k[1], (M, N)), util.normal(k[2], (M, N))
  dy, dout = jax.jit(jax.grad(lambda y, out: jnp.sum(
      pallas_kernels.scatter(y, _idx(), out, mode=mode, impl=impl, **BLOCKS) * g),
                              argnums=(0, 1)))(y, out)
  # By hand: dL/dy_i = g[idx_i]; dL/dout = g, except the overwritten rows ("set"), which get 0.
  idx, g64 = np.asarray(_idx()), np.asarray(g)
  want_dout = g64.copy()
  if mode == "set":
    want_dout[idx] = 0.0
  np.testing.assert_array_equal(np.asarray(dy), g64[idx])
  np.testing.assert_array_equal(np.asarray(dout), want_dout)


@INTERPRET
def test_gradients_run_the_other_ops_kernels(impl):
  x, w = jnp.ones((M, D)), jnp.ones((D, N))
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(
      pallas_kernels.gather_matmul(x, _idx(), w, impl=impl)), argnums=(0, 1)))(x, w))
  assert "scatter_set" in jaxpr  # dx: g w^T scattered into zeros by the scatter kernel
  y, out = jnp.ones((K, N)), jnp.ones((M, N))
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda y, out: jnp.sum(
      pallas_kernels.scatter(y, _idx(), out, mode="set", impl=impl)), argnums=(0, 1)))(y, out))
  assert "gather_rows" in jaxpr and "scatter_set" in jaxpr


@INTERPRET
@DTYPES
def test_gather_tmatmul_kernel_is_the_gathered_rows_transposed_times_g(impl, dtype):
  # dw of gather_matmul; 77 rows of 300 in blocks of 16, d = 768 in blocks of 256: the last row
  # block is partial and must not leak its unfetched rows.
  from pallas_kernels.gather_matmul import gpu, tpu  # pylint: disable=g-import-not-at-top
  backend, interpret = util.kernel_module(impl, tpu, gpu)
  k = util.keys(6, 2)
  x, g = util.normal(k[0], (300, 768), dtype), util.normal(k[1], (77, 330), dtype)
  idx = jax.random.permutation(jax.random.key(7), 300)[:77].astype(jnp.int32)
  got = jax.jit(lambda x, g: backend.gather_tmatmul(x, idx, g, block_rows=16, block_d=256,
                                                    interpret=interpret))(x, g)
  want = jnp.dot(jnp.take(x, idx, axis=0).T, g, preferred_element_type=jnp.float32)
  util.assert_matches(got, want.astype(dtype))
