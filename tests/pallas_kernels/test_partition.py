"""The kernels under a device mesh: each op partitions itself with jax.shard_map.

Export (in this process, on an abstract mesh: no devices needed): for tpu and for cuda, a jitted
call whose inputs are sharded over a 2-device `data` mesh and a 2 x 2 (data, tensor) mesh
exports (XLA alone cannot partition a Mosaic kernel: "Mosaic kernels cannot be automatically
partitioned"), holds the Mosaic / Triton custom call inside the shard_map's manual computation,
whose operands are the per-shard blocks (the token dimension split over data, never
all-gathered: the module has no all_gather), with the weights split over `tensor` where the op
splits them.

Numbers (a subprocess with 8 simulated CPU devices, partition_check.py): the interpreted kernels
on a (data 2, fsdp 2, tensor 2) mesh give the values and gradients of one device.
"""
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax import export
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P

import pallas_kernels
from pallas_kernels import _common

HERE = os.path.dirname(os.path.abspath(__file__))
S = jax.ShapeDtypeStruct
CUSTOM_CALL = {"tpu": "tpu_custom_call", "cuda": _common.TRITON_CUSTOM_CALL}
DISABLED = {"tpu": [], "cuda": [export.DisabledSafetyCheck.custom_call(_common.TRITON_CUSTOM_CALL)]}
MESHES = {"data2": ((2,), ("data",)), "data2_tensor2": ((2, 2), ("data", "tensor"))}
T, D, N, K = 512, 256, 1024, 200   # tokens, features, parameter tokens / columns, routed rows


def _sum(fn):
  """A loss that needs the forward value (pattention's backward is XLA's, its forward a kernel)."""
  return lambda *a: jnp.sum(jnp.square(fn(*a).astype(jnp.float32)))


def _gather(x, idx, w):
  return pallas_kernels.gather_matmul(x, idx, w, impl="pallas")


def _scatter(mode):
  return lambda y, idx, out: pallas_kernels.scatter(y, idx, out, mode=mode, impl="pallas")


def _pattention(x, k_p, v_p):
  return pallas_kernels.pattention(x, k_p, v_p, impl="pallas")


# name -> (function, argument specs as (shape, dtype, PartitionSpec on the 2 x 2 mesh), the
# per-shard shape of the first operand inside the manual computation on the 2 x 2 mesh)
OPS = {
    "gather_matmul": (_gather, [((T, D), jnp.bfloat16, P("data")), ((K,), jnp.int32, P("data")),
                                ((D, N), jnp.bfloat16, P(None, "tensor"))]),
    "gather_matmul_grad": (jax.grad(_sum(_gather), argnums=(0, 2)),
                           [((T, D), jnp.bfloat16, P("data")), ((K,), jnp.int32, P("data")),
                            ((D, N), jnp.bfloat16, P(None, "tensor"))]),
    "scatter_add": (_scatter("add"), [((K, D), jnp.bfloat16, P("data")),
                                      ((K,), jnp.int32, P("data")),
                                      ((T, D), jnp.bfloat16, P("data"))]),
    "scatter_set_grad": (jax.grad(_sum(_scatter("set")), argnums=(0, 2)),
                         [((K, D), jnp.bfloat16, P("data")), ((K,), jnp.int32, P("data")),
                          ((T, D), jnp.bfloat16, P("data"))]),
    "pattention": (_pattention, [((T, D), jnp.bfloat16, P("data")),
                                 ((N, D), jnp.bfloat16, P("tensor")),
                                 ((N, 384), jnp.bfloat16, P("tensor"))]),
    "pattention_grad": (jax.grad(_sum(_pattention), argnums=(0, 1, 2)),
                        [((T, D), jnp.bfloat16, P("data")), ((N, D), jnp.bfloat16, P("tensor")),
                         ((N, 384), jnp.bfloat16, P("tensor"))]),
}


def _spec_on(spec, names):
  """The spec restricted to the mesh's axes (the data mesh has no tensor axis)."""
  return P(*(a if a in names else None for a in spec))


def _module(op, platform, mesh_name):
  fn, args = OPS[op]
  shape, names = MESHES[mesh_name]
  mesh = AbstractMesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))
  specs = [S(s, dt, sharding=NamedSharding(mesh, _spec_on(p, names))) for s, dt, p in args]
  with jax.sharding.use_abstract_mesh(mesh):
    exported = export.export(jax.jit(fn), platforms=[platform],
                             disabled_checks=DISABLED[platform])(*specs)
  return exported.mlir_module()


def _manual_computations(module):
  return re.findall(r"sdy\.manual_computation\(.*?in_shardings=\[(.*?)\] out_shardings=.*?"
                    r"manual_axes=\{(.*?)\} \((.*?)\) \{", module)


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("op", sorted(OPS))
def test_sharded_call_exports_the_kernel_per_shard(op, platform, mesh_name):
  module = _module(op, platform, mesh_name)
  assert CUSTOM_CALL[platform] in module
  assert "all_gather" not in module
  manual = _manual_computations(module)
  assert manual, "the kernel is not inside a shard_map"
  for in_shardings, axes, operands in manual:
    assert '"data"' in axes and '{"data"}' in in_shardings, (axes, in_shardings)
  if not op.endswith("_grad"):
    # The token rows (the first operand's first dimension) come in split over data ...
    (in_shardings, _, operands), = manual
    assert in_shardings.startswith('<@mesh, [{"data"}'), in_shardings
    rows = OPS[op][1][0][0][0]
    assert re.match(rf"%\w+: tensor<{rows // 2}x", operands), operands
  if mesh_name == "data2_tensor2" and op.startswith(("gather_matmul", "pattention")):
    # ... and the weights over tensor: w's columns, K_P's and V_P's parameter tokens.
    assert any('{"tensor"}' in in_shardings for in_shardings, _, _ in manual)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_pattention_split_over_tensor_sums_norms_and_outputs_across_it(platform):
  module = _module("pattention", platform, "data2_tensor2")
  # Two all-reduces: the squared row norms, then the output partials.
  assert module.count("stablehlo.all_reduce") == 2
  assert module.count(CUSTOM_CALL[platform]) == 2  # row_norms and attend


def test_without_a_mesh_no_shard_map_is_staged():
  x, k_p, v_p = jnp.ones((16, 8)), jnp.ones((32, 8)), jnp.ones((32, 4))
  jaxpr = str(jax.make_jaxpr(lambda *a: pallas_kernels.pattention(*a, impl="interpret"))(
      x, k_p, v_p))
  assert "shard_map" not in jaxpr and "pallas_call" in jaxpr


def test_xla_impl_under_a_mesh_stages_no_shard_map():
  mesh = AbstractMesh((2,), ("data",), axis_types=(AxisType.Auto,))
  with jax.sharding.use_abstract_mesh(mesh):
    jaxpr = str(jax.make_jaxpr(lambda x, i, w: pallas_kernels.gather_matmul(x, i, w, impl="xla"))(
        jnp.ones((8, 4)), jnp.arange(4), jnp.ones((4, 4))))
  assert "shard_map" not in jaxpr


def test_interpreted_kernels_on_eight_devices_match_one_device():
  out = subprocess.run([sys.executable, os.path.join(HERE, "partition_check.py")],
                       capture_output=True, text=True, timeout=900, check=False,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert set(result) == {"gather_matmul", "scatter_add", "scatter_set", "pattention",
                         "pattention_no_tensor"}
  for name, err in result.items():
    assert err <= 1e-5, (name, err)
