"""gather_matmul and scatter: the token-routing primitives of top-k execute-or-skip.

    gather_matmul(x [m, d], idx [k], w [d, n]) = x[idx] @ w                       [k, n]
    scatter(y [k, n], idx [k], out [m, n], mode="add") = out; out[idx[i]] += y[i]
    scatter(y [k, n], idx [k], out [m, n], mode="set") = out; out[idx[i]]  = y[i]

Informed routing and Duo's capacity mode select k of m tokens (top-k with a capacity factor: k is
static, tokens beyond capacity are simply not selected), run a unit on them and write the
results back: `scatter(unit(gather_matmul(x, idx, w_in)), idx, base)`. The kernels fetch the
selected rows inside the kernel, so the gathered copy of x never lands in HBM; the scatter writes
only the selected rows of `out` (aliased, updated in place when the caller donates it).

Indices are clipped to [0, m) and must be distinct (top-k's are); with repeated indices the
result of the kernels is unspecified. w is cast to x.dtype and y to out.dtype; f32 accumulation.

Gradients (custom VJP; each op's backward runs the other's kernel, its transpose):
  gather_matmul  dx = scatter "set" of g w^T into zeros [m, d] (the scatter kernel; g w^T is a
                 dense XLA matmul), dw = x[idx]^T g (the gather_tmatmul kernel: the rows are
                 fetched inside it, so the backward never materialises x[idx] either).
  scatter        dy = g[idx] (the gather_rows kernel), dout = g ("add") or g with the rows idx
                 zeroed ("set": the scatter kernel writing zeros).

Under a device mesh (`jax.set_mesh`) both ops run per shard (pallas_kernels/_partition.py): the
rows of x / out and the entries of idx / y are split over the batch axes (data, fsdp), each
shard's indices addressing its own rows (routing per sequence row: a shard's capacity is k per
row of its rows); gather_matmul splits w's n over `tensor` (its output comes out split the
same way, as w is held by an FFN's first matmul), scatter keeps n whole. Blocks: see tpu.py and
gpu.py (None keeps the backend's choice).
"""
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels import _common
from pallas_kernels import _dispatch
from pallas_kernels import _partition
from pallas_kernels._partition import P
from pallas_kernels.gather_matmul import gpu
from pallas_kernels.gather_matmul import reference
from pallas_kernels.gather_matmul import tpu

MODES = ("add", "set")


def _blocks(**blocks):
  return {k: v for k, v in blocks.items() if v is not None}


@functools.lru_cache(maxsize=None)
def _kernel_ops(backend, interpret: bool, gather_blocks: tuple, scatter_blocks: tuple):
  """gather_matmul and scatter of one backend as custom-VJP functions whose backward passes run
  the backend's kernels (see the module docstring)."""
  gb, sb = dict(gather_blocks), dict(scatter_blocks)
  rows_blocks = {k: v for k, v in sb.items() if k in ("block_rows", "block_n")}

  def scatter_fwd_kernel(y, idx, out, mode):
    return backend.scatter(y, idx, out, mode=mode, interpret=interpret, **sb)

  @jax.custom_vjp
  def gather_op(x, idx, w):
    return backend.gather_matmul(x, idx, w, interpret=interpret, **gb)

  def gather_fwd(x, idx, w):
    return gather_op(x, idx, w), (x, idx, w)

  def gather_bwd(res, g):
    x, idx, w = res
    gx = jnp.dot(g, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
    dx = scatter_fwd_kernel(gx, idx, jnp.zeros_like(x), "set")
    dw = backend.gather_tmatmul(x, idx, g, interpret=interpret).astype(w.dtype)
    return dx, None, dw

  gather_op.defvjp(gather_fwd, gather_bwd)

  @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
  def scatter_op(y, idx, out, mode):
    return scatter_fwd_kernel(y, idx, out, mode)

  def scatter_fwd(y, idx, out, mode):
    return scatter_op(y, idx, out, mode), idx

  def scatter_bwd(mode, idx, g):
    dy = backend.gather_rows(g, idx, interpret=interpret, **rows_blocks)
    dout = g if mode == "add" else scatter_fwd_kernel(jnp.zeros_like(dy), idx, g, "set")
    return dy, None, dout

  scatter_op.defvjp(scatter_fwd, scatter_bwd)
  return {"gather_matmul": gather_op, "scatter": scatter_op}


def _kernels(blocks_tpu, blocks_gpu, scatter_tpu, scatter_gpu):
  """(tpu, gpu) callables for _dispatch: (op name, *args, interpret) -> result."""
  def tpu_fn(op, *args, interpret):
    return _kernel_ops(tpu, interpret, tuple(sorted(blocks_tpu.items())),
                       tuple(sorted(scatter_tpu.items())))[op](*args)

  def gpu_fn(op, *args, interpret):
    return _kernel_ops(gpu, interpret, tuple(sorted(blocks_gpu.items())),
                       tuple(sorted(scatter_gpu.items())))[op](*args)
  return tpu_fn, gpu_fn


def gather_matmul(x: jax.Array, idx: jax.Array, w: jax.Array, *, impl: Optional[str] = None,
                  block_rows: Optional[int] = None, block_n: Optional[int] = None,
                  block_d: Optional[int] = None) -> jax.Array:
  """x[idx] @ w without materialising x[idx]: x [m, d], idx int [k], w [d, n] -> [k, n]."""
  if x.ndim != 2 or w.ndim != 2 or idx.ndim != 1 or w.shape[0] != x.shape[1]:
    raise ValueError(f"gather_matmul: needs x [m, d], idx [k], w [d, n]; got {x.shape}, "
                     f"{idx.shape}, {w.shape}.")
  if idx.shape[0] == 0:  # a capacity that rounded to zero: no kernel has an empty grid
    return jnp.zeros((0, w.shape[1]), x.dtype)
  impl = _dispatch.resolve(impl)
  tpu_fn, gpu_fn = _kernels(_blocks(block_rows=block_rows, block_n=block_n),
                            _blocks(block_rows=block_rows, block_n=block_n, block_d=block_d),
                            {}, {})
  args = (x, jnp.asarray(idx, jnp.int32), w.astype(x.dtype))

  def run(x, idx, w, split=None):
    if split is not None:
      idx = _partition.local_rows(split, idx, x.shape[0])
    # One variance for every operand before the custom VJP, so that the cotangent of an operand
    # replicated over a split axis is summed over it (the transpose of this cast) by autodiff.
    x, idx, w = _common.match_varying(x, idx, w)
    return _dispatch.dispatch(
        impl, x, idx, w, reference=reference.gather_matmul,
        tpu=lambda *a, interpret: tpu_fn("gather_matmul", *a, interpret=interpret),
        gpu=lambda *a, interpret: gpu_fn("gather_matmul", *a, interpret=interpret))

  split = None if impl == "xla" else _partition.split_for(
      (x.shape[0], idx.shape[0]), tensor_dim=w.shape[1])
  if split is None:
    return run(*args)
  rows, tensor = split.row_spec, split.tensor
  return _partition.shard(functools.partial(run, split=split), split,
                          in_specs=(P(rows, None), P(rows), P(None, tensor)),
                          out_specs=P(rows, tensor))(*args)


def scatter(y: jax.Array, idx: jax.Array, out: jax.Array, *, mode: str = "add",
            impl: Optional[str] = None, block_rows: Optional[int] = None,
            block_n: Optional[int] = None) -> jax.Array:
  """Writes ("set") or adds ("add") rows y [k, n] into out [m, n] at rows idx [k]."""
  if mode not in MODES:
    raise ValueError(f"scatter: mode {mode!r} is not one of {MODES}.")
  if y.ndim != 2 or out.ndim != 2 or idx.shape != (y.shape[0],) or y.shape[1] != out.shape[1]:
    raise ValueError(f"scatter: needs y [k, n], idx [k], out [m, n]; got {y.shape}, "
                     f"{idx.shape}, {out.shape}.")
  if idx.shape[0] == 0:
    return out
  impl = _dispatch.resolve(impl)
  blocks = _blocks(block_rows=block_rows, block_n=block_n)
  tpu_fn, gpu_fn = _kernels({}, {}, _blocks(block_rows=block_rows), blocks)
  args = (y.astype(out.dtype), jnp.asarray(idx, jnp.int32), out)

  def run(y, idx, out, split=None):
    if split is not None:
      idx = _partition.local_rows(split, idx, out.shape[0])
    y, idx, out = _common.match_varying(y, idx, out)
    return _dispatch.dispatch(
        impl, y, idx, out, reference=functools.partial(reference.scatter, mode=mode),
        tpu=lambda *a, interpret: tpu_fn("scatter", *a, mode, interpret=interpret),
        gpu=lambda *a, interpret: gpu_fn("scatter", *a, mode, interpret=interpret))

  split = None if impl == "xla" else _partition.split_for((out.shape[0], idx.shape[0]))
  if split is None:
    return run(*args)
  rows = split.row_spec
  return _partition.shard(functools.partial(run, split=split), split,
                          in_specs=(P(rows, None), P(rows), P(rows, None)),
                          out_specs=P(rows, None))(*args)


__all__ = ["gather_matmul", "scatter", "MODES"]
