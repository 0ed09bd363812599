"""Run as a script with 8 simulated CPU devices; prints JSON for test_sharding.py.

Trains a few steps of a small decoder on one device and on a data x fsdp = 2 x 4 mesh from
the same initial parameters and batches, and reports both losses and how params are sharded.
With the argument `tokenformer`: configs/tokenformer.gin (made small) with its Pattention
kernels in Mosaic's interpreter (configure_kernels.impl = 'interpret'), on one device and on a
(data 2, fsdp 2, tensor 2) mesh, where each Pattention runs per shard with its parameter tokens
split over tensor. With `informed_gather`: configs/informed_routing.gin (small) with
`routed_ffn.compute = 'gather'`, its gather_matmul / scatter kernels interpreted, on the same two
meshes (rows and their per-row indices split over data and fsdp).
"""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import numpy as np

from adacomp import sharding, training
from adacomp.models import build
from adacomp.models.decoder import DecoderConfig


TOKENFORMER_SMALL = ("DecoderConfig.num_layers = 1", "DecoderConfig.d_model = 32",
                     "DecoderConfig.num_heads = 2", "DecoderConfig.head_dim = 16",
                     "DecoderConfig.vocab_size = 64", "tokenformer_attention.n_qkv = 32",
                     "tokenformer_attention.n_out = 32", "tokenformer_ffn.n_ffn = 64",
                     "configure_kernels.impl = 'interpret'")


def small_decoder():
  return build.build_decoder(64, DecoderConfig(vocab_size=64, num_layers=2, d_model=64,
                                               num_heads=4, head_dim=16, d_ff=128, max_len=32))


INFORMED_GATHER_SMALL = ("DecoderConfig.num_layers = 1", "DecoderConfig.d_model = 32",
                         "DecoderConfig.num_heads = 2", "DecoderConfig.head_dim = 16",
                         "DecoderConfig.d_ff = 64", "DecoderConfig.vocab_size = 64",
                         "routed_ffn.compute = 'gather'", "configure_kernels.impl = 'interpret'")


def from_gin(gin_file, bindings):
  from adacomp import gin_utils, kernels  # pylint: disable=g-import-not-at-top
  from adacomp.methods import registry  # pylint: disable=g-import-not-at-top,unused-import
  gin_utils.parse([os.path.join(gin_utils.CONFIGS_DIR, gin_file)], bindings)
  assert kernels.configure_kernels() == "interpret"
  return build.build_decoder(64)


def run(mesh, model, steps=3):
  rules = sharding.logical_axis_rules()
  tx = training.make_optimizer(10, learning_rate=1e-2, warmup_steps=0)
  rng = np.random.default_rng(0)
  losses = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, _, shardings = training.init_train_state(model, tx, 16, 0, mesh, rules)
    step = jax.jit(training.make_train_step(model, tx, 0), out_shardings=(shardings, None))
    for _ in range(steps):
      ids = rng.integers(0, 64, (8, 17))
      batch = {"inputs": ids[:, :-1].astype(np.int32), "targets": ids[:, 1:].astype(np.int32),
               "weights": np.ones((8, 16), np.float32),
               "target_bytes": np.ones((8, 16), np.float32)}
      state, metrics = step(state, sharding.global_batch(batch, mesh))
      losses.append(float(metrics["loss"]))
  if "wi" not in state.params["blocks"]["ffn"]:
    return losses, {}
  wi = state.params["blocks"]["ffn"]["wi"]
  return losses, {"wi_spec": str(wi.sharding.spec),
                  "wi_shard_shape": list(wi.addressable_shards[0].data.shape),
                  "wi_shape": list(wi.shape),
                  "batch_spec": str(sharding.batch_sharding(mesh).spec)}


def main():
  devices = jax.devices()
  assert len(devices) == 8, devices
  if sys.argv[1:] == ["tokenformer"]:
    model, axes = from_gin("tokenformer.gin", TOKENFORMER_SMALL), dict(data=2, fsdp=2, tensor=2)
  elif sys.argv[1:] == ["informed_gather"]:
    model = from_gin("informed_routing.gin", INFORMED_GATHER_SMALL)
    axes = dict(data=2, fsdp=2, tensor=2)
  else:
    model, axes = small_decoder(), dict(data=2, fsdp=4, tensor=1)
  one, _ = run(sharding.make_mesh(data=1, fsdp=1, tensor=1, devices=devices[:1]), model)
  eight, info = run(sharding.make_mesh(**axes, devices=devices), model)
  json.dump({"one_device": one, "eight_devices": eight, **info}, sys.stdout)


if __name__ == "__main__":
  main()
