"""FeatureForecaster (informed routing's LFF): a rank-r linear forecast of a unit's output."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from layers.forecaster import FeatureForecaster, distillation_loss, forecaster_macs
from layers.mlp import feed_forward

D, R = 16, 4


def _init(rank=R, d=D):
  module = FeatureForecaster(rank)
  params = nn.meta.unbox(module.init(jax.random.key(0), jnp.zeros((1, d)))["params"])
  return module, params


def test_forecast_is_the_rank_r_product_x_a_b():
  module, params = _init()
  params = {"down": params["down"], "up": jax.random.normal(jax.random.key(1), (R, D))}
  x = np.asarray(jax.random.normal(jax.random.key(2), (3, 5, D)))
  expected = x @ np.asarray(params["down"]) @ np.asarray(params["up"])
  np.testing.assert_allclose(module.apply({"params": params}, x), expected, rtol=1e-5, atol=1e-5)
  assert params["down"].shape == (D, R) and params["up"].shape == (R, D)


def test_untrained_forecaster_predicts_zero_the_greedy_identity():
  module, params = _init()
  x = jax.random.normal(jax.random.key(3), (2, 7, D))
  np.testing.assert_array_equal(module.apply({"params": params}, x), np.zeros((2, 7, D)))


def test_macs_are_two_d_r():
  assert forecaster_macs(128, 16) == 2 * 128 * 16
  assert FeatureForecaster(16).macs(128) == 4096


def test_distillation_loss_is_the_mean_squared_error():
  t = np.arange(12.0).reshape(3, 4)
  f = np.ones((3, 4))
  assert float(distillation_loss(t, f)) == pytest.approx(np.mean((t - 1.0) ** 2))


def test_nonpositive_rank_is_refused_with_the_fix():
  with pytest.raises(ValueError, match="forecaster_rank"):
    FeatureForecaster(0).init(jax.random.key(0), jnp.zeros((1, D)))


def test_distillation_lowers_held_out_error_towards_the_best_rank_r_map():
  """Distil against a frozen random FFN on one sample; the error on fresh inputs falls well
  below the untrained (zero) forecast and approaches the least-squares rank-r optimum."""
  module, params = _init()
  k1, k2, k3 = jax.random.split(jax.random.key(4), 3)
  w_in = jax.random.normal(k1, (D, 4 * D)) / np.sqrt(D)
  w_out = jax.random.normal(k2, (4 * D, D)) / np.sqrt(4 * D)
  # Inputs with a dominant low-rank structure, as hidden states have.
  basis = jax.random.normal(k3, (R, D))
  make_x = lambda key, n: (jax.random.normal(key, (n, R)) @ basis
                           + 0.1 * jax.random.normal(jax.random.fold_in(key, 1), (n, D)))
  unit = lambda x: feed_forward(x, w_in, w_out, "gelu")
  x_train, x_test = make_x(jax.random.key(5), 512), make_x(jax.random.key(6), 512)
  y_train, y_test = unit(x_train), unit(x_test)

  def held_out(p):
    return float(distillation_loss(y_test, module.apply({"params": p}, x_test)))

  tx = optax.adam(3e-2)
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    grads = jax.grad(lambda p: distillation_loss(y_train, module.apply({"params": p}, x_train)))(p)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  before = held_out(params)
  for _ in range(300):
    params, state = step(params, state)
  after = held_out(params)
  # Best rank-R linear map by least squares then truncated SVD of its fitted values.
  x, y = np.asarray(x_train, np.float64), np.asarray(y_train, np.float64)
  w = np.linalg.lstsq(x, y, rcond=None)[0]
  u, s, vt = np.linalg.svd(x @ w, full_matrices=False)
  w_r = np.linalg.lstsq(x, (u[:, :R] * s[:R]) @ vt[:R], rcond=None)[0]
  optimum = float(np.mean((np.asarray(x_test) @ w_r - np.asarray(y_test)) ** 2))
  assert before == pytest.approx(float(jnp.mean(y_test ** 2)))
  assert after < 0.5 * before
  assert after < 1.5 * optimum + 1e-4, (after, optimum, before)
