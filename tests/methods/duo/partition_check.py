"""Run as a script with 8 simulated CPU devices; prints JSON for test_partition.py.

Duo stage 1 (configs/duo.gin: random mix_exact routes, compute "sorted") at a tiny size:
  * two train steps with impl="interpret" (routed_ffn's TPU kernels under Mosaic's
    interpreter, per shard) on one device and on a (data 2, fsdp 2, tensor 2) mesh, from the same
    initial parameters and batches: both loss curves;
  * the train step (impl "auto") exported for TPU under a 2 x 2 (data, tensor) mesh: whether
    the module holds the Mosaic kernels' custom calls.
"""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import flax.linen as nn  # pylint: disable=g-import-not-at-top
import gin
import jax
import numpy as np
from jax import export

from adacomp import sharding, training
from adacomp.methods.duo import factories  # pylint: disable=unused-import  (registers duo_ffn)
from adacomp.models import build
from adacomp.models.decoder import DecoderConfig

TINY = """
DecoderConfig.num_layers = 1
DecoderConfig.d_model = 32
DecoderConfig.num_heads = 2
DecoderConfig.head_dim = 16
DecoderConfig.d_ff = 64
DecoderConfig.max_len = 16
"""
B, T = 4, 16


def _model(impl):
  gin.clear_config()
  gin.parse_config_files_and_bindings(["configs/duo.gin"], [TINY, f"duo_ffn.impl = '{impl}'"])
  return build.build_decoder(64, DecoderConfig())


def _batches(steps):
  """One batch, repeated: the loss falls step by step."""
  ids = np.random.default_rng(0).integers(0, 64, (B, T + 1))
  for _ in range(steps):
    yield {"inputs": ids[:, :-1].astype(np.int32), "targets": ids[:, 1:].astype(np.int32),
           "weights": np.ones((B, T), np.float32), "target_bytes": np.ones((B, T), np.float32)}


def losses(mesh, steps=2):
  model, rules = _model("interpret"), sharding.logical_axis_rules()
  tx = training.make_optimizer(10, learning_rate=1e-2, warmup_steps=0)
  out = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, _, shardings = training.init_train_state(model, tx, T, 0, mesh, rules)
    step = jax.jit(training.make_train_step(model, tx, 0), out_shardings=(shardings, None))
    for batch in _batches(steps):
      state, metrics = step(state, sharding.global_batch(batch, mesh))
      out.append(float(metrics["loss"]))
  return out


def tpu_export_has_kernels(mesh):
  model, rules = _model("auto"), sharding.logical_axis_rules()
  tx = training.make_optimizer(10, learning_rate=1e-2, warmup_steps=0)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, _, _ = training.init_train_state(model, tx, T, 0, mesh, rules)
    batch = sharding.global_batch(next(_batches(1)), mesh)
    spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding)
    module = export.export(jax.jit(training.make_train_step(model, tx, 0)), platforms=["tpu"])(
        jax.tree.map(spec, state), jax.tree.map(spec, batch)).mlir_module()
  return {"tpu_custom_call": "tpu_custom_call" in module,
          "routed_gmm": module.count("routed_gmm") > 0, "routed_tgmm": "routed_tgmm" in module}


def main():
  devices = jax.devices()
  assert len(devices) == 8, devices
  one = losses(sharding.make_mesh(data=1, fsdp=1, tensor=1, devices=devices[:1]))
  eight = losses(sharding.make_mesh(data=2, fsdp=2, tensor=2, devices=devices))
  exported = tpu_export_has_kernels(sharding.make_mesh(data=2, fsdp=1, tensor=2,
                                                       devices=devices[:4]))
  print(json.dumps({"one_device": one, "eight_devices": eight, **exported}))


if __name__ == "__main__":
  sys.exit(main())
