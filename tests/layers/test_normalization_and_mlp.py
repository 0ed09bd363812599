import jax
import jax.numpy as jnp
import numpy as np

from layers.mlp import DenseFFN
from layers.normalization import RMSNorm


def test_rmsnorm_divides_by_root_mean_square():
  x = jax.random.normal(jax.random.key(0), (3, 10)) * 5 + 1
  variables = RMSNorm().init(jax.random.key(1), x)
  y = RMSNorm().apply(variables, x)
  want = np.asarray(x) / np.sqrt(np.mean(np.asarray(x) ** 2, -1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(y, want, rtol=1e-5)


def test_dense_ffn_is_w_out_gelu_w_in_and_reports_its_macs():
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  module = DenseFFN(d_ff=32)
  variables = module.init(jax.random.key(1), x)
  y, state = module.apply(variables, x, mutable=["intermediates"])
  p = jax.tree.map(np.asarray, jax.tree.map(lambda v: v.value, variables["params"],
                                            is_leaf=lambda v: hasattr(v, "value")))
  h = np.asarray(x) @ p["wi"]
  gelu = 0.5 * h * (1 + np.vectorize(__import__("math").erf)(h / np.sqrt(2)))
  np.testing.assert_allclose(y, gelu @ p["wo"], rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(state["intermediates"]["macs"][0], np.full((2, 5), 2 * 8 * 32))
