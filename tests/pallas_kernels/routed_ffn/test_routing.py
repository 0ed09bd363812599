"""sort_by_route / unsort_by_route and stack_ffn_weights."""
import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from pallas_kernels.routed_ffn import routing
from tests.pallas_kernels import util
from tests.pallas_kernels.routed_ffn import test_reference

ROUTES = jnp.array([2, -1, 0, 2, 1, 0, 3, 2, 0, -1])  # 3 groups; -1 and 3 are skipped


def test_sort_groups_rows_by_route_in_order_with_skipped_rows_last():
  x = jnp.arange(10.0)[:, None]
  sorted_x, _ = pallas_kernels.sort_by_route(x, ROUTES, 3)
  np.testing.assert_array_equal(sorted_x[:, 0], [2, 5, 8, 4, 0, 3, 7, 1, 6, 9])


def test_group_sizes_count_the_rows_of_each_route():
  _, rs = pallas_kernels.sort_by_route(jnp.zeros((10, 1)), ROUTES, 3)
  np.testing.assert_array_equal(rs.group_sizes, [3, 1, 3])


def test_unsort_restores_the_input_order():
  x = util.normal(util.keys(0, 1)[0], (10, 4))
  sorted_x, rs = pallas_kernels.sort_by_route(x, ROUTES, 3)
  np.testing.assert_array_equal(pallas_kernels.unsort_by_route(sorted_x, rs), x)


def test_sort_backward_is_the_unsort_gather_not_a_scatter():
  x = util.normal(util.keys(0, 1)[0], (10, 4))
  rs = pallas_kernels.route_sort(ROUTES, 3)
  weights = util.normal(util.keys(1, 1)[0], (10, 4))
  loss = lambda x: jnp.sum(routing.permute_rows(x, rs.order, rs.inverse) * weights)
  np.testing.assert_array_equal(jax.grad(loss)(x), pallas_kernels.unsort_by_route(weights, rs))
  assert "scatter" not in str(jax.make_jaxpr(jax.grad(loss))(x))


def test_stack_ffn_weights_pads_every_group_to_the_widest():
  k = util.keys(0, 4)
  small = (util.normal(k[0], (8, 4)), util.normal(k[1], (4, 8)))
  big = (util.normal(k[2], (8, 16)), util.normal(k[3], (16, 8)))
  w_in, w_out, widths = pallas_kernels.stack_ffn_weights([small, big])
  assert w_in.shape == (2, 8, 16) and w_out.shape == (2, 16, 8)
  np.testing.assert_array_equal(widths, [4, 16])
  np.testing.assert_array_equal(w_in[0, :, :4], small[0])


def test_sorted_routed_ffn_equals_each_token_through_its_own_ffn():
  k = util.keys(0, 5)
  x = util.normal(k[0], (10, 8))
  pairs = [(util.normal(k[1], (8, 4)), util.normal(k[2], (4, 8))),
           (util.normal(k[3], (8, 12)), util.normal(k[4], (12, 8)))]
  routes = jnp.array([1, 0, -1, 1, 1, 0, -1, 0, 1, 1])

  def sort_ffn_unsort(x, routes):
    w_in, w_out, widths = pallas_kernels.stack_ffn_weights(pairs)
    sorted_x, rs = pallas_kernels.sort_by_route(x, routes, 2)
    y = pallas_kernels.routed_ffn(sorted_x, rs.group_sizes, w_in, w_out, widths, impl="xla")
    return pallas_kernels.unsort_by_route(y, rs)

  out = np.asarray(jax.jit(sort_ffn_unsort)(x, routes))
  x, pairs = np.asarray(x, np.float64), [tuple(map(np.asarray, p)) for p in pairs]
  for r, g in enumerate(np.asarray(routes)):
    expected = 0 if g < 0 else test_reference.gelu(x[r] @ pairs[g][0]) @ pairs[g][1]
    np.testing.assert_allclose(out[r], expected, rtol=1e-5, atol=1e-5)
