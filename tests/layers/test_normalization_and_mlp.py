import jax
import jax.numpy as jnp
import numpy as np

from layers.mlp import DenseFFN
from layers.normalization import LayerNorm, RMSNorm


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


def test_gated_ffn_with_biases_is_swiglu_and_reports_three_matmuls():
  x = jax.random.normal(jax.random.key(0), (2, 3, 8))
  module = DenseFFN(d_ff=16, activation="silu", gated=True, use_bias=True)
  variables = module.init(jax.random.key(1), x)
  p = jax.tree.map(np.asarray, jax.tree.map(lambda v: v.value, variables["params"],
                                            is_leaf=lambda v: hasattr(v, "value")))
  p = {k: v + 0.1 * (i + 1) for i, (k, v) in enumerate(sorted(p.items()))}  # non-zero biases
  y, state = module.apply({"params": p}, x, mutable=["intermediates"])
  xs = np.asarray(x)
  gate = xs @ p["wi_gate"] + p["bi_gate"]
  want = (gate / (1 + np.exp(-gate)) * (xs @ p["wi"] + p["bi"])) @ p["wo"] + p["bo"]
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(state["intermediates"]["macs"][0], np.full((2, 3), 3 * 8 * 16))


def test_layernorm_with_scale_and_bias_and_epsilon():
  x = jax.random.normal(jax.random.key(0), (3, 10)) * 0.01
  module = LayerNorm(epsilon=1e-5, use_scale=True, use_bias=True)
  scale, bias = np.linspace(0.5, 1.5, 10), np.linspace(-1, 1, 10)
  y = module.apply({"params": {"scale": scale, "bias": bias}}, x)
  xs = np.asarray(x)
  want = (xs - xs.mean(-1, keepdims=True)) / np.sqrt(xs.var(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(y, want * scale + bias, rtol=1e-5, atol=1e-5)
