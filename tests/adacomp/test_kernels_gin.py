"""configure_kernels: a gin binding decides what the kernel ops run when called with impl=None."""
import gin
import jax
import jax.numpy as jnp
import pytest

import pallas_kernels
from adacomp import kernels


@pytest.fixture(autouse=True)
def _restore_auto():
  yield
  pallas_kernels.set_default_impl("auto")


def _staged_ops():
  """The jaxpr of a routed_ffn call that leaves impl to the process default."""
  x = jnp.ones((16, 128))
  w_in, w_out = jnp.ones((2, 128, 128)), jnp.ones((2, 128, 128))
  return str(jax.make_jaxpr(lambda x: pallas_kernels.routed_ffn(
      x, jnp.array([8, 4]), w_in, w_out))(x))


def _configure(binding):
  gin.parse_config(binding)
  return kernels.configure_kernels()


def test_default_binding_stages_kernels_behind_the_platform_switch():
  assert _configure("") == "auto"
  staged = _staged_ops()
  assert "platform_index" in staged and "pallas_call" in staged


def test_xla_binding_makes_ops_stage_only_the_reference():
  assert _configure("configure_kernels.impl = 'xla'") == "xla"
  assert pallas_kernels.get_default_impl() == "xla"
  staged = _staged_ops()
  assert "pallas_call" not in staged and "platform_index" not in staged


def test_interpret_binding_makes_ops_stage_the_kernel_without_the_switch():
  _configure("configure_kernels.impl = 'interpret'")
  staged = _staged_ops()
  assert "pallas_call" in staged and "platform_index" not in staged


def test_unknown_impl_is_rejected_and_leaves_the_default_alone():
  with pytest.raises(ValueError, match="configure_kernels.impl"):
    _configure("configure_kernels.impl = 'cuda'")
  assert pallas_kernels.get_default_impl() == "auto"
