import json
import os
import subprocess
import sys

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import pytest
from jax import export
from jax.sharding import AbstractMesh, AxisType, NamedSharding

from adacomp import gin_utils, kernels, sharding, training
from adacomp.models import build

HERE = os.path.dirname(os.path.abspath(__file__))


def test_train_step_on_eight_devices_matches_one_device_and_shards_params():
  out = subprocess.run([sys.executable, os.path.join(HERE, "sharding_check.py")],
                       capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout)
  for a, b in zip(result["one_device"], result["eight_devices"]):
    assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), result
  # wi is [layers, embed, mlp]: embed is split over fsdp=4, so each shard holds a quarter.
  assert result["wi_spec"] in ("P(None, 'fsdp', 'tensor')",
                               "PartitionSpec(None, 'fsdp', 'tensor')")
  assert result["wi_shard_shape"] == [2, 64 // 4, 128]
  assert result["wi_shape"] == [2, 64, 128]


def test_make_mesh_fills_the_minus_one_axis():
  mesh = sharding.make_mesh(data=-1, fsdp=1, tensor=1)
  assert mesh.shape == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}


def test_make_mesh_rejects_a_shape_that_does_not_match_the_devices():
  with pytest.raises(ValueError, match="does not match the 1 available devices"):
    sharding.make_mesh(data=2, fsdp=1, tensor=1, devices=jax.devices()[:1])


# `python tests/adacomp/sharding_check.py informed_gather` checks informed routing's gather
# compute the same way (max difference 5e-7); it is left out of the suite for time.
@pytest.mark.parametrize("config", ["tokenformer"])
def test_kernel_train_steps_interpreted_on_a_2x2x2_mesh_match_one_device(config):
  # configs/tokenformer.gin (small), Pattention kernels in Mosaic's interpreter, on a (data 2,
  # fsdp 2, tensor 2) mesh: each Pattention runs per shard, its parameter tokens split over
  # tensor with the psums of the row norms and the outputs.
  out = subprocess.run([sys.executable, os.path.join(HERE, "sharding_check.py"), config],
                       capture_output=True, text=True, timeout=900, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout)
  assert len(result["one_device"]) == 3
  for a, b in zip(result["one_device"], result["eight_devices"]):
    assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), result


# Small versions of the configs, for exporting their train steps.
SMALL = ("DecoderConfig.num_layers = 2", "DecoderConfig.d_model = 64",
         "DecoderConfig.num_heads = 2", "DecoderConfig.head_dim = 32", "DecoderConfig.d_ff = 128",
         "DecoderConfig.vocab_size = 64")
TOKENFORMER_SMALL = SMALL + ("tokenformer_attention.n_qkv = 64", "tokenformer_attention.n_out = 64",
                             "tokenformer_ffn.n_ffn = 128")


def _exported_train_step(gin_file, bindings, platform="tpu"):
  """The train step of `gin_file` exported for `platform` on an abstract (data 2, fsdp 1,
  tensor 2) mesh, with the train state and the batch sharded as training shards them."""
  gin.clear_config()
  try:
    gin_utils.parse([os.path.join(gin_utils.CONFIGS_DIR, gin_file)], bindings)
    assert kernels.configure_kernels() == "auto"
    model = build.build_decoder(64)
    tx = training.make_optimizer(10)
    mesh = AbstractMesh((2, 1, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    rules = sharding.logical_axis_rules()
    with jax.sharding.use_abstract_mesh(mesh), nn.logical_axis_rules(rules):
      def init_fn(key):
        params = model.init(key, jnp.zeros((2, 16), jnp.int32))["params"]
        return training.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                   opt_state=tx.init(params))
      boxed = jax.eval_shape(init_fn, jax.random.key(0))
      state = sharding.abstract_with_shardings(
          boxed, sharding.logical_shardings(boxed, mesh, rules))
      rows = NamedSharding(mesh, sharding.batch_sharding(mesh).spec)
      batch = {name: jax.ShapeDtypeStruct((8, 16), dtype, sharding=rows)
               for name, dtype in (("inputs", jnp.int32), ("targets", jnp.int32),
                                   ("weights", jnp.float32), ("target_bytes", jnp.float32))}
      exported = export.export(jax.jit(training.make_train_step(model, tx, 0)),
                               platforms=[platform])(state, batch)
    return exported.mlir_module()
  finally:
    gin.clear_config()


def test_tokenformer_train_step_exports_for_tpu_on_a_2x2_mesh_with_the_pattention_kernels():
  module = _exported_train_step("tokenformer.gin", TOKENFORMER_SMALL)
  # The layers are one scanned block: its (q, k, v, out, ffn) Pattentions, each split over
  # tensor, run row_norms and attend in the forward pass (the backward is XLA's).
  assert module.count("tpu_custom_call") == 5 * 2
  assert "pattention_norms" in module and "pattention_attend" in module
  assert module.count("sdy.manual_computation") >= 5


def test_informed_routing_gather_train_step_exports_for_tpu_on_a_2x2_mesh_with_the_kernels():
  module = _exported_train_step("informed_routing.gin",
                                SMALL + ("routed_ffn.compute = 'gather'",))
  assert "tpu_custom_call" in module and "sdy.manual_computation" in module
  # gather_matmul (forward) and the scatters, whose backward passes run kernels too.
  for name in ("gather_matmul", "scatter_set", "gather_rows"):
    assert name in module, name
