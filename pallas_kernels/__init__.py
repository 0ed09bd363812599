"""Routed sparse compute kernels: Pallas on TPU (Mosaic) and GPU (Triton), XLA reference on CPU.

Ops (each sub-package holds reference.py, the specification in plain jnp; tpu.py; gpu.py):

  routed_ffn        each group of rows (sorted by route) runs its own FFN; skipped rows do no
                    work. With sort_by_route / unsort_by_route and stack_ffn_weights.
  gather_matmul     x[idx] @ w without materialising x[idx].
  scatter           out[idx] += y, or out[idx] = y.
  pattention        TokenFormer's Theta(X K_P^T) V_P without the score matrix in HBM.

Every op takes `impl` (None, "auto", "xla", "pallas", "interpret", "interpret_gpu"); None means
the process-wide default, "auto" unless `set_default_impl` or `default_impl(...)` says otherwise
(see _dispatch.py). Only jax is imported here: no flax, no gin.

The ops' names shadow their sub-packages as attributes of this package; reach a sub-module with
`from pallas_kernels.routed_ffn import reference`.
"""
from pallas_kernels._dispatch import IMPLS
from pallas_kernels._dispatch import default_impl
from pallas_kernels._dispatch import get_default_impl
from pallas_kernels._dispatch import set_default_impl
from pallas_kernels.gather_matmul import gather_matmul
from pallas_kernels.gather_matmul import scatter
from pallas_kernels.pattention import pattention
from pallas_kernels.routed_ffn import RouteSort
from pallas_kernels.routed_ffn import route_sort
from pallas_kernels.routed_ffn import routed_ffn
from pallas_kernels.routed_ffn import sort_by_route
from pallas_kernels.routed_ffn import stack_ffn_weights
from pallas_kernels.routed_ffn import unsort_by_route

__all__ = [
    "IMPLS", "default_impl", "get_default_impl", "set_default_impl", "gather_matmul", "scatter",
    "pattention", "RouteSort", "route_sort", "routed_ffn", "sort_by_route", "stack_ffn_weights",
    "unsort_by_route",
]
