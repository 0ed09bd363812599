"""Shared checks for the kernel tests.

Tolerances, per element: float32 outputs match to rtol 1e-5 plus an absolute slack of
1e-5 x max|expected| (elements that cancel to near 0 carry the rounding of their large terms);
bfloat16 to rtol 1e-2 of each element (about one bf16 ulp, 2^-7: the output rounding after
an f32 accumulation in another order) plus a floor of 2e-3 x max|expected| for elements that
cancel, where a flipped rounding of an intermediate (probabilities, Theta) outweighs the result
(the largest seen: 1e-3 x max, in softmax-like outputs). A wrong element anywhere larger than 1% (or
0.2% of the largest) fails. Every comparison also requires the kernel output to be finite: the
interpreters fill output memory with NaN before the kernel runs (Mosaic's TPU interpreter fills
each VMEM output block, the HLO interpreter each output array), so an element the kernel forgot
to write shows up as NaN. test_dispatch.py checks that premise.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np

# The kernel implementations the tests run. On CPU: the TPU kernel under Mosaic's TPU interpreter
# and the Triton kernel under the HLO interpreter. On an accelerator,
# ADACOMP_KERNEL_TEST_IMPLS=pallas runs the same tests on the compiled kernel of the platform
# (benchmarks/run_accelerator.sh sets it).
INTERPRETERS = tuple(os.environ.get("ADACOMP_KERNEL_TEST_IMPLS",
                                    "interpret,interpret_gpu").split(","))


def kernel_module(impl: str, tpu, gpu):
  """(module, interpret) for tests that call a kernel module's functions directly."""
  if impl == "pallas":
    return (tpu if jax.default_backend() == "tpu" else gpu), False
  return {"interpret": tpu, "interpret_gpu": gpu}[impl], True

# dtype -> (relative tolerance per element, absolute floor as a fraction of max|expected|)
TOLERANCE = {jnp.dtype(jnp.float32): (1e-5, 1e-5), jnp.dtype(jnp.bfloat16): (1e-2, 2e-3)}


def assert_matches(actual, expected):
  """actual (kernel) is finite and equals expected (reference) within the dtype's tolerance."""
  assert actual.shape == expected.shape and actual.dtype == expected.dtype
  rtol, floor = TOLERANCE[jnp.dtype(expected.dtype)]
  actual = np.asarray(jnp.asarray(actual, jnp.float32))
  expected = np.asarray(jnp.asarray(expected, jnp.float32))
  assert np.isfinite(actual).all(), f"{np.size(actual) - np.isfinite(actual).sum()} non-finite"
  scale = max(float(np.abs(expected).max(initial=0.0)), 1e-30)
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=floor * scale)


def jit_call(fn, *args, **kwargs):
  """fn(*args, **kwargs) compiled as one program: eager dispatch of the ops' wrappers (schedules,
  transposes) would compile every small op separately and dominate the tests' time."""
  return jax.jit(lambda *a: fn(*a, **kwargs))(*args)


def normal(key, shape, dtype=jnp.float32, scale=1.0):
  """Random normal test data (never zeros)."""
  return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def keys(seed, n):
  return jax.random.split(jax.random.key(seed), n)
