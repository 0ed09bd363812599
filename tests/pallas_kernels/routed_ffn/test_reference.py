"""The routed_ffn specification (reference.py) against independent, obviously-right forms."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.routed_ffn import reference
from tests.pallas_kernels import util


def gelu(a):
  """The exact GeLU, x Phi(x), in float64 numpy: the model's "gelu" (layers.mlp)."""
  a = np.asarray(a, np.float64)
  return 0.5 * a * (1 + np.vectorize(math.erf)(a / np.sqrt(2)))


def gelu_tanh(a):
  """The tanh form of GeLU, in numpy."""
  a = np.asarray(a, np.float64)
  return 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a ** 3)))


def _weights(e=2, d=16, f=24, seed=0):
  k = util.keys(seed, 3)
  return (util.normal(k[0], (20, d)), util.normal(k[1], (e, d, f), scale=0.3),
          util.normal(k[2], (e, f, d), scale=0.3))


@pytest.mark.parametrize("activation, act", [("gelu", gelu), ("gelu_tanh", gelu_tanh)])
def test_single_group_of_all_rows_equals_the_dense_ffn(activation, act):
  x, w_in, w_out = _weights(e=1)
  out = util.jit_call(reference.routed_ffn, x, jnp.array([20]), w_in, w_out, jnp.array([24]),
                      activation=activation)
  x, w_in, w_out = (np.asarray(a, np.float64) for a in (x, w_in, w_out))
  np.testing.assert_allclose(out, act(x @ w_in[0]) @ w_out[0], rtol=1e-5, atol=1e-5)


def test_unknown_activation_is_refused_naming_the_choices():
  x, w_in, w_out = _weights(e=1)
  with pytest.raises(ValueError, match="gelu_tanh"):
    reference.routed_ffn(x, jnp.array([20]), w_in, w_out, jnp.array([24]), activation="tanh")


def test_each_row_uses_its_groups_first_width_units_and_skipped_rows_are_zero():
  x, w_in, w_out = _weights()
  sizes, widths = jnp.array([7, 9]), jnp.array([24, 10])
  out = np.asarray(util.jit_call(reference.routed_ffn, x, sizes, w_in, w_out, widths))
  x, w_in, w_out = (np.asarray(a, np.float64) for a in (x, w_in, w_out))
  for r in range(20):
    g = 0 if r < 7 else 1 if r < 16 else None
    if g is None:
      assert (out[r] == 0).all()
    else:
      f = int(widths[g])
      expected = gelu(x[r] @ w_in[g][:, :f]) @ w_out[g][:f]
      np.testing.assert_allclose(out[r], expected, rtol=1e-5, atol=1e-5)


def test_gmm_multiplies_each_row_by_its_groups_matrix():
  x, w_in, _ = _weights()
  out = np.asarray(util.jit_call(reference.gmm, x, w_in, jnp.array([5, 11])))
  expected = np.concatenate([x[:5] @ w_in[0], x[5:16] @ w_in[1], np.zeros((4, 24))])
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_tgmm_sums_outer_products_over_each_groups_rows():
  x, _, _ = _weights()
  y = util.normal(util.keys(1, 1)[0], (20, 8))
  out = np.asarray(util.jit_call(reference.tgmm, x, y, jnp.array([5, 0, 11])))
  np.testing.assert_allclose(out[0], x[:5].T @ y[:5], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out[1], 0)
  np.testing.assert_allclose(out[2], x[5:16].T @ y[5:16], rtol=1e-5, atol=1e-5)
