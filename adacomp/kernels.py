"""Gin hook for the routed-compute kernels: which implementation `impl=None` ops run.

    configure_kernels.impl = 'xla'   # or 'auto' (default), 'pallas', 'interpret', 'interpret_gpu'

The training loop calls `configure_kernels()` once after parsing gin; layers keep calling the
`pallas_kernels` ops with `impl=None`. `pallas_kernels.get_default_impl()` reports the choice.
"""
import gin

import pallas_kernels


@gin.configurable
def configure_kernels(impl: str = "auto") -> str:
  """Sets the process-wide kernel implementation (see pallas_kernels/_dispatch.py); returns it."""
  if impl not in pallas_kernels.IMPLS:
    raise ValueError(f"configure_kernels.impl = {impl!r}; choose one of {pallas_kernels.IMPLS}.")
  pallas_kernels.set_default_impl(impl)
  return impl
