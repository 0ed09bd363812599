"""Helpers shared by the kernels: activations, tile arithmetic, interpret settings, VJP glue."""
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

# routed_ffn's "gelu" is the tanh form in every implementation (its references and kernels are
# compared to 1e-5; layers/duo.py names it "gelu_tanh"). Pattention uses the exact GeLU below.
ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}

_SQRT_HALF = 0.7071067811865476
# Taylor coefficients of erf(x) = 2/sqrt(pi) sum_n (-1)^n x^(2n+1) / (n! (2n+1)), n = 0..10:
# below |x| = 0.8 the first omitted term is < 4e-9.
_ERF_SERIES = tuple(2.0 / math.sqrt(math.pi) * (-1) ** n / (math.factorial(n) * (2 * n + 1))
                    for n in range(11))
# Numerical Recipes' erfc Chebyshev fit (`erfcc`, fractional error < 1.2e-7 for x >= 0):
# erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z / 2).
_ERFC_FIT = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807,
             -1.13520398, 1.48851587, -0.82215223, 0.17087277)
_SERIES_BELOW = 0.8


def _horner(coefficients, x):
  acc = coefficients[-1]
  for c in coefficients[-2::-1]:
    acc = acc * x + c
  return acc


def _erf_pieces(x):
  """(|x| < 0.8, erf(x) by its series there, erfc(|x|) by the fit elsewhere), float32."""
  z = jnp.abs(x)
  t = 1.0 / (1.0 + 0.5 * z)
  tail = t * jnp.exp(-z * z + _horner(_ERFC_FIT, t))
  return z < _SERIES_BELOW, x * _horner(_ERF_SERIES, x * x), tail


def erf_f32(x):
  """erf in float32 from exp and arithmetic only (Triton lowers no erf): max absolute error
  1.3e-7 against float64 (jax's own float32 erf: 3.2e-7), tested on a dense grid."""
  small, series, tail = _erf_pieces(x)
  return jnp.where(small, series, jnp.where(x >= 0, 1.0 - tail, tail - 1.0))


def erfc_f32(x):
  """erfc in float32, as erf_f32; relative accuracy kept in the tail (x > 0.8)."""
  small, series, tail = _erf_pieces(x)
  return jnp.where(small, 1.0 - series, jnp.where(x >= 0, tail, 2.0 - tail))


def gelu_exact(x):
  """Exact GeLU, x Phi(x) = x erfc(-x / sqrt 2) / 2 (PyTorch's F.gelu): the specification."""
  return jax.nn.gelu(x, approximate=False)


def gelu_exact_mosaic(x):
  """Exact GeLU for Mosaic TPU kernels, which lower lax.erf but not lax.erfc."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * _SQRT_HALF))


def gelu_exact_triton(x):
  """Exact GeLU for Triton kernels, from erfc_f32 (float32 accuracy, no erf primitive)."""
  return 0.5 * x * erfc_f32(-x * _SQRT_HALF)


# Mosaic's TPU interpreter models VMEM: a visited output block starts as NaN and is copied out
# whole, exactly as on hardware, so a kernel that leaves part of a block unwritten shows NaN;
# an out-of-bounds read raises. The plain HLO interpreter would hide both mistakes.
TPU_INTERPRET = pltpu.InterpretParams(uninitialized_memory="nan", out_of_bounds_reads="raise")

# Triton kernels that lower for `platforms=["cuda"]` emit this custom call; `jax.export` needs
# it listed in `disabled_checks` because it carries no compatibility guarantee.
TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"


def _varying(a) -> frozenset:
  return frozenset(jax.typeof(a).manual_axis_type.varying)


def match_varying(*arrays):
  """Inside a shard_map (check_vma on): every array cast to vary over the union of the mesh axes
  any of them varies over, the one variance a pallas_call takes and returns. Outside: as is."""
  axes = frozenset().union(*(_varying(a) for a in arrays))
  return tuple(jax.lax.pcast(a, tuple(sorted(axes - _varying(a))), to="varying")
               for a in arrays)


def out_struct(shape, dtype, like) -> jax.ShapeDtypeStruct:
  """A kernel's out_shape, varying over the mesh axes `like` (a match_varying input) does."""
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).manual_axis_type)


def cost(flops, bytes_accessed, transcendentals=0):
  """The pl.CostEstimate XLA schedules a kernel's custom call by (counts are per call)."""
  return pl.CostEstimate(flops=int(flops), transcendentals=int(transcendentals),
                         bytes_accessed=int(bytes_accessed))



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


# Triton tiles, chosen per shape in this one place (aimed at H100 / H200-class GPUs; not timed:
# no GPU was available when they were set). A dimension's block is the largest of the table's
# sizes its length reaches, else the power of two covering it (>= 16):
#
#   dimension                      length >=   block
#   rows (tokens / gathered rows)  1024        128
#                                  128         64
#   columns (output features)      256         128
#   depth (the matmul's k loop)    128         64        (else 32; always 32 for 4-byte inputs)
#
# warps: 8 when a tile holds >= 128 x 128 accumulators, else 4; stages (software pipelining of
# the k loop): 3 when the loop has >= 3 trips, else 2. Shared memory per program, stages x
# (bm + bn) x depth x itemsize, stays <= 96 KiB (bf16 128 x 128 x 64 or f32 128 x 128 x 32).
TRITON_ROWS = ((1024, 128), (128, 64))
TRITON_COLS = ((256, 128),)
TRITON_DEPTH = ((128, 64),)


def _from_table(size: int, table, fallback: int) -> int:
  for at_least, block in table:
    if size >= at_least:
      return block
  return gpu_block(size, fallback)


def triton_tiles(rows: int, cols: int, depth: int, dtype=jnp.bfloat16):
  """(block_rows, block_cols, block_depth, CompilerParams) for a [rows, depth] x [depth, cols]
  tile loop of `dtype` inputs, from the table above."""
  bm = _from_table(rows, TRITON_ROWS, 64)
  bn = _from_table(cols, TRITON_COLS, 128)
  bk = _from_table(depth, TRITON_DEPTH if jnp.dtype(dtype).itemsize < 4 else (), 32)
  warps = 8 if bm * bn >= 128 * 128 else 4
  stages = 3 if cdiv(depth, bk) >= 3 else 2
  return bm, bn, bk, triton_params(warps, stages)


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
