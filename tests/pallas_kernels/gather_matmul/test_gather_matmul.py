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
def test_gather_matmul_gradients_match_the_reference(impl):
  k = util.keys(1, 3)
  x, w = util.normal(k[0], (M, D)), util.normal(k[1], (D, N))
  cotangent = util.normal(k[2], (K, N))
  grads = {i: jax.jit(jax.grad(lambda x, w: jnp.sum(
      pallas_kernels.gather_matmul(x, _idx(), w, impl=i, **BLOCKS) * cotangent),
                               argnums=(0, 1)))(x, w) for i in (impl, "xla")}
  for got, want in zip(grads[impl], grads["xla"]):
    util.assert_matches(got, want)


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
def test_zero_capacity_gathers_nothing_and_scatters_nothing(impl):
  x, w, out = jnp.ones((M, D)), jnp.ones((D, N)), jnp.ones((M, N))
  none = jnp.zeros((0,), jnp.int32)
  assert pallas_kernels.gather_matmul(x, none, w, impl=impl).shape == (0, N)
  np.testing.assert_array_equal(
      pallas_kernels.scatter(jnp.zeros((0, N)), none, out, impl=impl), out)


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
