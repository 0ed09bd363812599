"""pattention: the TPU and GPU kernels, interpreted on CPU, against the reference; its spec."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.pattention import reference
from tests.pallas_kernels import util

# 37 tokens in blocks of 16, 300 parameter tokens in blocks of 128: nothing divides evenly.
T, D_IN, N, D_OUT = 37, 96, 300, 80
BLOCKS = dict(block_t=16, block_n=128)
INTERPRET = pytest.mark.parametrize("impl", util.INTERPRETERS)


def _inputs(dtype=jnp.float32, seed=0):
  k = util.keys(seed, 3)
  return (util.normal(k[0], (T, D_IN), dtype), util.normal(k[1], (N, D_IN), dtype),
          util.normal(k[2], (N, D_OUT), dtype, N ** -0.5))


@INTERPRET
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_pattention_matches_reference(impl, dtype):
  x, k_p, v_p = _inputs(dtype)
  out = util.jit_call(pallas_kernels.pattention, x, k_p, v_p, impl=impl, **BLOCKS)
  util.assert_matches(out, util.jit_call(pallas_kernels.pattention, x, k_p, v_p, impl="xla"))


@INTERPRET
def test_pattention_gradients_match_the_reference(impl):
  x, k_p, v_p = _inputs()
  cotangent = util.normal(util.keys(3, 1)[0], (T, D_OUT))
  grads = {i: jax.jit(jax.grad(lambda *a: jnp.sum(
      pallas_kernels.pattention(*a, impl=i, **BLOCKS) * cotangent), argnums=(0, 1, 2)))(
          x, k_p, v_p) for i in (impl, "xla")}
  for got, want in zip(grads[impl], grads["xla"]):
    util.assert_matches(got, want)


@INTERPRET
def test_zero_parameter_tokens_added_with_the_old_tau_leave_the_output_unchanged(impl):
  # TokenFormer grows a model by appending zero-initialised key/value tokens; keeping tau at its
  # old value keeps every row norm, so the function is unchanged.
  x, k_p, v_p = _inputs()
  grown_k = jnp.concatenate([k_p, jnp.zeros((60, D_IN))])
  grown_v = jnp.concatenate([v_p, jnp.zeros((60, D_OUT))])
  grown = util.jit_call(pallas_kernels.pattention, x, grown_k, grown_v, tau=math.sqrt(N),
                        impl=impl, **BLOCKS)
  util.assert_matches(grown, util.jit_call(pallas_kernels.pattention, x, k_p, v_p, impl="xla"))


def test_reference_is_gelu_of_rows_scaled_to_norm_tau_times_values():
  x, k_p, v_p = _inputs()
  s = np.asarray(x, np.float64) @ np.asarray(k_p, np.float64).T
  a = s * math.sqrt(N) / np.linalg.norm(s, axis=1, keepdims=True)
  expected = np.asarray(jax.nn.gelu(jnp.asarray(a, jnp.float32))) @ np.asarray(v_p)
  out = pallas_kernels.pattention(x, k_p, v_p, impl="xla")
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_leading_dims_are_flattened_into_tokens():
  x, k_p, v_p = _inputs()
  batched = pallas_kernels.pattention(jnp.stack([x, -x]), k_p, v_p, impl="xla")
  assert batched.shape == (2, T, D_OUT)
  util.assert_matches(batched[1], reference.pattention(-x, k_p, v_p, tau=math.sqrt(N)))
