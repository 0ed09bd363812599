"""Run as a script with 8 simulated CPU devices; prints JSON for test_partition.py.

Each op with impl="interpret" (the TPU kernels under Mosaic's interpreter), its value and its
gradients, on one device and under `jax.set_mesh` of a (data 2, fsdp 2, tensor 2) mesh with the
inputs sharded as the layers hold them (pattention also on data 2 x fsdp 4, no tensor split).
Prints, per op, the largest difference relative to the largest magnitude of the one-device
results.
"""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"  # simulated devices, also on a machine with an accelerator
import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import pallas_kernels

BATCH = ("data", "fsdp")
B, T, D, F, K_ROW = 8, 16, 32, 48, 5   # sequences, tokens per row, features, columns, k per row


def _routed_rows(key):
  """Per-row top-k as the routing layers pick them: k of each row's t tokens, as flat rows."""
  scores = jax.random.normal(key, (B, T))
  _, top = jax.lax.top_k(scores, K_ROW)
  return (top + T * jnp.arange(B)[:, None]).reshape(-1).astype(jnp.int32)


def _cases(key):
  k = jax.random.split(key, 8)
  x = jax.random.normal(k[0], (B * T, D))
  idx = _routed_rows(k[1])
  w = jax.random.normal(k[2], (D, F)) * D ** -0.5
  y = jax.random.normal(k[3], (B * K_ROW, D))
  out = jax.random.normal(k[4], (B * T, D))
  k_p = jax.random.normal(k[5], (64, D))
  v_p = jax.random.normal(k[6], (64, 40)) * 0.125
  ct = lambda shape: jax.random.normal(k[7], shape)

  def gather(x, w, idx):
    return pallas_kernels.gather_matmul(x, idx, w, impl="interpret")

  def scatter(mode):
    return lambda y, out, idx: pallas_kernels.scatter(y, idx, out, mode=mode, impl="interpret")

  def pattention(x, k_p, v_p):
    return pallas_kernels.pattention(x, k_p, v_p, impl="interpret")

  mesh_tensor = dict(data=2, fsdp=2, tensor=2)
  return {
      "gather_matmul": (gather, (x, w), (P(BATCH), P(None, "tensor")), idx,
                        ct((B * K_ROW, F)), mesh_tensor),
      "scatter_add": (scatter("add"), (y, out), (P(BATCH), P(BATCH)), idx, ct((B * T, D)),
                      mesh_tensor),
      "scatter_set": (scatter("set"), (y, out), (P(BATCH), P(BATCH)), idx, ct((B * T, D)),
                      mesh_tensor),
      "pattention": (lambda x, k_p, v_p, _: pattention(x, k_p, v_p), (x, k_p, v_p),
                     (P(BATCH), P("tensor"), P("tensor")), None, ct((B * T, 40)), mesh_tensor),
      "pattention_no_tensor": (lambda x, k_p, v_p, _: pattention(x, k_p, v_p), (x, k_p, v_p),
                               (P(BATCH), P(), P()), None, ct((B * T, 40)),
                               dict(data=2, fsdp=4, tensor=1)),
  }


def _value_and_grads(fn, args, extra, cotangent):
  def loss(*a):
    return jnp.sum(fn(*a, extra) * cotangent)

  value = jax.jit(lambda *a: fn(*a, extra))(*args)
  grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)
  return [np.asarray(value)] + [np.asarray(g) for g in grads]


def main():
  from adacomp import sharding  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 8, jax.devices()
  result = {}
  for name, (fn, args, specs, extra, cotangent, axes) in _cases(jax.random.key(0)).items():
    one = _value_and_grads(fn, args, extra, cotangent)
    mesh = sharding.make_mesh(**axes)
    with jax.set_mesh(mesh):
      placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]
      extra_placed = None if extra is None else jax.device_put(extra,
                                                               NamedSharding(mesh, P(BATCH)))
      many = _value_and_grads(fn, placed, extra_placed, cotangent)
    result[name] = max(float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))
                       for a, b in zip(one, many))
  print(json.dumps(result))


if __name__ == "__main__":
  sys.exit(main())
