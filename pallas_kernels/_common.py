"""Helpers shared by the kernels: activations, tile arithmetic, interpret settings, VJP glue."""
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

# Triton has no erf, so every implementation (reference included) uses the tanh form of GeLU:
# one definition everywhere keeps the kernels and their references comparable to 1e-5.
ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}

# Mosaic's TPU interpreter models VMEM: a visited output block starts as NaN and is copied out
# whole, exactly as on hardware, so a kernel that leaves part of a block unwritten shows NaN;
# an out-of-bounds read raises. The plain HLO interpreter would hide both mistakes.
TPU_INTERPRET = pltpu.InterpretParams(uninitialized_memory="nan", out_of_bounds_reads="raise")

# Triton kernels that lower for `platforms=["cuda"]` emit this custom call; `jax.export` needs
# it listed in `disabled_checks` because it carries no compatibility guarantee.
TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"Unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


def cdiv(a, b):
  """Ceiling division of non-negative numbers; truncating lax.div for traced values, because
  floor division lowers through `sign`, whose Mosaic rule needs a real TPU to lower."""
  if isinstance(a, int) and isinstance(b, int):
    return (a + b - 1) // b
  a = jnp.asarray(a)
  return jax.lax.div(a + b - 1, jnp.asarray(b, a.dtype))


def round_up(a: int, b: int) -> int:
  return cdiv(a, b) * b


def next_pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def tpu_block(size: int, block: int, align: int) -> int:
  """Largest legal TPU block <= `block`: the whole dimension, or a multiple of `align`."""
  if size <= block:
    return size
  return max(align, block // align * align)


def sublane_align(dtype) -> int:
  """Rows per native TPU tile: 8 for 32-bit, 16 for bf16 (two rows pack in a sublane)."""
  return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def gpu_block(size: int, block: int, minimum: int = 16) -> int:
  """A power-of-two Triton block <= `block` that covers small dimensions without waste."""
  return max(minimum, min(next_pow2(size), next_pow2(block)))


def triton_params(num_warps: int = 4, num_stages: int = 2):
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


# Row statistics (norms, softmax max and sum) live in VMEM replicated across the 128 lanes, the
# layout jax's own TPU flash attention uses, rather than as a (rows, 1) column.
LANES = 128


def tpu_select(mask, x):
  """where(mask, x, 0) on TPU, selecting in f32: not every TPU generation selects bf16."""
  return jnp.where(mask, x.astype(jnp.float32), 0.0).astype(x.dtype)


def read_row_stat(ref):
  """(rows, 1) from a lane-replicated (rows, LANES) scratch."""
  return ref[...][:, :1]


def write_row_stat(ref, value):
  ref[...] = jnp.broadcast_to(value, ref.shape)


def with_reference_vjp(kernel: Callable, reference: Callable, diff_argnums: Sequence[int]):
  """`kernel` forward, gradients from the reference recomputed in XLA (no backward kernel).

  Arguments outside `diff_argnums` (indices, lengths) get no cotangent.
  """
  diff_argnums = tuple(diff_argnums)

  @jax.custom_vjp
  def op(*args):
    return kernel(*args)

  def fwd(*args):
    return kernel(*args), args

  def bwd(args, g):
    def on_diff(*diff):
      full = list(args)
      for i, a in zip(diff_argnums, diff):
        full[i] = a
      return reference(*full)

    _, vjp = jax.vjp(on_diff, *(args[i] for i in diff_argnums))
    cts = dict(zip(diff_argnums, vjp(g)))
    return tuple(cts.get(i) for i in range(len(args)))

  op.defvjp(fwd, bwd)
  return op
