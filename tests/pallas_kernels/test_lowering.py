"""Every kernel lowers through Pallas' TPU (Mosaic) and GPU (Triton) pipelines on a CPU machine.

`jax.export` for one platform at a time runs the Pallas-to-Mosaic / Pallas-to-Triton lowering,
which rejects illegal block shapes, layouts, dtypes and unsupported primitives, and leaves the
kernel in the module as a `tpu_custom_call` or a `__gpu$xla.gpu.triton` custom call. Compiling
that custom call (libtpu / ptxas) needs the hardware and is not checked here.
"""
import re

import jax
import jax.numpy as jnp
import pytest
from jax import export

import pallas_kernels
from pallas_kernels import _common

S = jax.ShapeDtypeStruct
I32 = jnp.int32
CUSTOM_CALL = {"tpu": "tpu_custom_call", "cuda": _common.TRITON_CUSTOM_CALL}
DISABLED = {"tpu": [], "cuda": [export.DisabledSafetyCheck.custom_call(_common.TRITON_CUSTOM_CALL)]}


def _ffn_args(dt):
  return S((512, 256), dt), S((2,), I32), S((2, 256, 1024), dt), S((2, 1024, 256), dt), S((2,), I32)


def _ffn_grad(impl):
  def loss(x, sizes, w_in, w_out, widths):
    y = pallas_kernels.routed_ffn(x, sizes, w_in, w_out, widths, impl=impl)
    return jnp.sum(y.astype(jnp.float32))

  return jax.grad(loss, argnums=(0, 2, 3))


def _gather_grad(impl):
  """dx and dw of gather_matmul: the scatter and gather_tmatmul kernels."""
  def loss(x, idx, w):
    return jnp.sum(pallas_kernels.gather_matmul(x, idx, w, impl=impl).astype(jnp.float32))
  return jax.grad(loss, argnums=(0, 2))


def _scatter_grad(impl):
  """dy and dout of scatter "set": the gather_rows and scatter kernels."""
  def loss(y, idx, out):
    return jnp.sum(pallas_kernels.scatter(y, idx, out, mode="set", impl=impl).astype(jnp.float32))
  return jax.grad(loss, argnums=(0, 2))


# name -> (function of impl, argument shapes given a dtype)
OPS = {
    "routed_ffn": (lambda impl: lambda *a: pallas_kernels.routed_ffn(*a, impl=impl), _ffn_args),
    "routed_ffn_grad": (_ffn_grad, _ffn_args),
    "gather_matmul": (lambda impl: lambda *a: pallas_kernels.gather_matmul(*a, impl=impl),
                      lambda dt: (S((512, 256), dt), S((200,), I32), S((256, 512), dt))),
    "gather_matmul_grad": (_gather_grad,
                           lambda dt: (S((512, 256), dt), S((200,), I32), S((256, 512), dt))),
    "scatter_set_grad": (_scatter_grad,
                         lambda dt: (S((200, 256), dt), S((200,), I32), S((512, 256), dt))),
    "scatter_add": (lambda impl: lambda *a: pallas_kernels.scatter(*a, mode="add", impl=impl),
                    lambda dt: (S((200, 256), dt), S((200,), I32), S((512, 256), dt))),
    "scatter_set": (lambda impl: lambda *a: pallas_kernels.scatter(*a, mode="set", impl=impl),
                    lambda dt: (S((200, 256), dt), S((200,), I32), S((512, 256), dt))),
    "pattention": (lambda impl: lambda *a: pallas_kernels.pattention(*a, impl=impl),
                   lambda dt: (S((512, 256), dt), S((1024, 256), dt), S((1024, 384), dt))),
}


def _ffn_args_unaligned(dt):
  return (S((300, 200), dt), S((2,), I32), S((2, 200, 520), dt), S((2, 520, 200), dt),
          S((2,), I32))


# The same ops on shapes that are multiples of neither the (8, 128) TPU tile nor a power of two:
# the kernels' masking and padding must lower too, not only the aligned fast path.
UNALIGNED = {
    "routed_ffn": _ffn_args_unaligned,
    "routed_ffn_grad": _ffn_args_unaligned,
    "gather_matmul": lambda dt: (S((300, 200), dt), S((77,), I32), S((200, 330), dt)),
    "gather_matmul_grad": lambda dt: (S((300, 200), dt), S((77,), I32), S((200, 330), dt)),
    "scatter_set_grad": lambda dt: (S((77, 200), dt), S((77,), I32), S((300, 200), dt)),
    "scatter_add": lambda dt: (S((77, 200), dt), S((77,), I32), S((300, 200), dt)),
    "scatter_set": lambda dt: (S((77, 200), dt), S((77,), I32), S((300, 200), dt)),
    "pattention": lambda dt: (S((300, 200), dt), S((700, 200), dt), S((700, 330), dt)),
}


def _module(op, impl, platform, dtype, aligned=True):
  fn, shapes = OPS[op]
  shapes = shapes if aligned else UNALIGNED[op]
  exported = export.export(jax.jit(fn(impl)), platforms=[platform],
                           disabled_checks=DISABLED.get(platform, []))(*shapes(dtype))
  return exported.mlir_module()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("op", sorted(OPS))
def test_pallas_kernel_lowers_to_the_platform_custom_call(op, platform, dtype):
  assert CUSTOM_CALL[platform] in _module(op, "pallas", platform, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("op", sorted(OPS))
def test_pallas_kernel_lowers_unaligned_shapes_to_the_platform_custom_call(op, platform, dtype):
  assert CUSTOM_CALL[platform] in _module(op, "pallas", platform, dtype, aligned=False)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_auto_exports_the_kernel_of_the_target_platform_only(platform):
  module = _module("routed_ffn", "auto", platform, jnp.bfloat16)
  other = "cuda" if platform == "tpu" else "tpu"
  assert CUSTOM_CALL[platform] in module and CUSTOM_CALL[other] not in module


def test_auto_exports_the_reference_for_cpu():
  assert "custom_call" not in _module("routed_ffn", "auto", "cpu", jnp.float32)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_gather_and_scatter_backward_passes_run_kernels_not_xla_dots(platform):
  module = _module("gather_matmul_grad", "pallas", platform, jnp.bfloat16)
  assert "scatter_set" in module and "gather_tmatmul" in module
  module = _module("scatter_set_grad", "pallas", platform, jnp.bfloat16)
  assert "gather_rows" in module and "scatter_set" in module


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_routed_ffn_backward_runs_grouped_matmul_kernels_not_xla_dots(platform):
  module = _module("routed_ffn_grad", "pallas", platform, jnp.bfloat16)
  assert "routed_gmm" in module and "routed_tgmm" in module
  assert "stablehlo.dot_general" not in module


@pytest.mark.parametrize("op", sorted(op for op in OPS if not op.startswith("routed_ffn")))
def test_every_tpu_kernel_gives_xla_a_cost_estimate(op):
  module = _module(op, "pallas", "tpu", jnp.bfloat16)
  calls = module.count("stablehlo.custom_call @tpu_custom_call")
  assert calls and module.count(r"\22cost_estimate\22") == calls
  assert re.search(r"flops\\22:[1-9]", module) or op.startswith("scatter_set")


def test_pattention_at_d_4096_in_bf16_lowers_with_a_vmem_limit_above_its_blocks():
  args = (S((8192, 4096), jnp.bfloat16), S((4096, 4096), jnp.bfloat16),
          S((4096, 4096), jnp.bfloat16))
  module = export.export(jax.jit(lambda *a: pallas_kernels.pattention(*a, impl="pallas")),
                         platforms=["tpu"])(*args).mlir_module()
  limit = int(re.search(r"scoped_memory_configs\\22: \[\{\\22memory_space\\22:1, \\22offset\\22:"
                        r" 0, \\22size\\22: (\d+)", module).group(1))
  assert 16 * 2 ** 20 <= limit <= 48 * 2 ** 20
