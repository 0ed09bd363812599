"""impl selection: the process default, its context manager, and what each impl stages."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from tests.pallas_kernels import util


def _args():
  k = util.keys(0, 2)
  return util.normal(k[0], (24, 128)), jnp.array([3, 0, 17, 9], jnp.int32), util.normal(
      k[1], (128, 128))


def _jaxpr(impl=None):
  return str(jax.make_jaxpr(lambda *a: pallas_kernels.gather_matmul(*a, impl=impl))(*_args()))


def test_default_impl_is_auto():
  assert pallas_kernels.get_default_impl() == "auto"


def test_set_default_impl_rejects_unknown_names():
  with pytest.raises(ValueError, match="triton"):
    pallas_kernels.set_default_impl("triton")


def test_op_rejects_unknown_impl():
  with pytest.raises(ValueError, match="Unknown kernel impl"):
    pallas_kernels.gather_matmul(*_args(), impl="fast")


def test_default_impl_context_manager_sets_then_restores():
  with pallas_kernels.default_impl("xla"):
    assert pallas_kernels.get_default_impl() == "xla"
    assert "pallas_call" not in _jaxpr()
  assert pallas_kernels.get_default_impl() == "auto"


def test_auto_stages_both_kernels_behind_a_platform_switch():
  jaxpr = _jaxpr("auto")
  assert "platform_index" in jaxpr and jaxpr.count("pallas_call") == 2


def test_xla_stages_only_the_reference():
  jaxpr = _jaxpr("xla")
  assert "pallas_call" not in jaxpr and "platform_index" not in jaxpr


def test_interpret_stages_one_kernel_without_a_platform_switch():
  jaxpr = _jaxpr("interpret")
  assert jaxpr.count("pallas_call") == 1 and "platform_index" not in jaxpr


def test_none_follows_the_process_default():
  pallas_kernels.set_default_impl("interpret")
  assert _jaxpr(None) == _jaxpr("interpret")


def test_auto_lowers_without_a_kernel_on_cpu_and_computes_the_gathered_product():
  x, idx, w = _args()
  lowered = jax.jit(lambda *a: pallas_kernels.gather_matmul(*a, impl="auto")).lower(x, idx, w)
  assert "custom_call" not in lowered.as_text()
  np.testing.assert_allclose(
      pallas_kernels.gather_matmul(x, idx, w, impl="auto"),
      np.asarray(x, np.float64)[np.asarray(idx)] @ np.asarray(w, np.float64),
      rtol=1e-5, atol=1e-5)


def test_pallas_impl_cannot_lower_for_cpu():
  with pytest.raises(NotImplementedError, match="platform_index"):
    jax.jit(lambda *a: pallas_kernels.gather_matmul(*a, impl="pallas")).lower(*_args())
