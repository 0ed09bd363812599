"""routed_ffn.ffn_by_route under a device mesh: per shard with jax.shard_map.

Export (abstract meshes, no devices needed): for tpu and cuda, a jitted call (and its gradient)
whose token rows are sharded over a 2-device `data` mesh and a 2 x 2 (data, tensor) mesh
exports with the Mosaic / Triton custom call inside the manual computation, the rows entering
split over data and never all-gathered, the hidden units split over tensor with one psum.
Numbers: routed_ffn_partition_check.py (8 simulated CPU devices) gives one device's values and
gradients on a (data 2, fsdp 2, tensor 2) mesh.
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

from pallas_kernels import _common
from pallas_kernels.routed_ffn import ffn_by_route

HERE = os.path.dirname(os.path.abspath(__file__))
S = jax.ShapeDtypeStruct
CUSTOM_CALL = {"tpu": "tpu_custom_call", "cuda": _common.TRITON_CUSTOM_CALL}
DISABLED = {"tpu": [], "cuda": [export.DisabledSafetyCheck.custom_call(_common.TRITON_CUSTOM_CALL)]}
MESHES = {"data2": ((2,), ("data",)), "data2_tensor2": ((2, 2), ("data", "tensor"))}
M, D, F = 512, 256, 1024


def _ffn(x, routes, w_in, w_out, widths):
  return ffn_by_route(x, routes, w_in, w_out, widths, impl="pallas")


def _grad(x, routes, w_in, w_out, widths):
  loss = lambda x, w_in, w_out: jnp.sum(jnp.square(
      _ffn(x, routes, w_in, w_out, widths).astype(jnp.float32)))
  return jax.grad(loss, argnums=(0, 1, 2))(x, w_in, w_out)


def _module(fn, platform, mesh_name):
  shape, names = MESHES[mesh_name]
  mesh = AbstractMesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))
  on = lambda *spec: NamedSharding(mesh, P(*(a if a in names else None for a in spec)))
  args = [S((M, D), jnp.bfloat16, sharding=on("data")), S((M,), jnp.int32, sharding=on("data")),
          S((2, D, F), jnp.bfloat16, sharding=on(None, None, "tensor")),
          S((2, F, D), jnp.bfloat16, sharding=on(None, "tensor")), S((2,), jnp.int32)]
  with jax.sharding.use_abstract_mesh(mesh):
    exported = export.export(jax.jit(fn), platforms=[platform],
                             disabled_checks=DISABLED[platform])(*args)
  return exported.mlir_module()


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("fn", [_ffn, _grad], ids=["forward", "grad"])
def test_sharded_ffn_by_route_exports_the_kernel_per_shard(fn, platform, mesh_name):
  module = _module(fn, platform, mesh_name)
  assert CUSTOM_CALL[platform] in module
  assert "all_gather" not in module
  manual = re.findall(r"sdy\.manual_computation\(.*?in_shardings=\[(.*?)\] out_shardings=.*?"
                      r"manual_axes=\{(.*?)\} \((.*?)\) \{", module)
  assert manual, "the kernel is not inside a shard_map"
  for in_shardings, _, operands in manual:
    assert in_shardings.startswith('<@mesh, [{"data"}'), in_shardings
    assert re.match(rf"%\w+: tensor<{M // 2}x{D}x", operands), operands   # per-shard rows
    if mesh_name == "data2_tensor2":
      assert '{"tensor"}' in in_shardings
  if mesh_name == "data2_tensor2" and fn is _ffn:
    assert module.count("stablehlo.all_reduce") == 1   # the psum of the partial outputs


def test_interpreted_ffn_by_route_on_eight_devices_matches_one_device():
  out = subprocess.run([sys.executable, os.path.join(HERE, "routed_ffn_partition_check.py")],
                       capture_output=True, text=True, timeout=900, check=False,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["relative_error"] <= 1e-5, result
