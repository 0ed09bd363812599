"""Run as a script with 8 simulated CPU devices; prints JSON for test_partition.py.

ffn_by_route with impl="interpret" (the TPU kernels under Mosaic's interpreter), its value and
gradients, on one device and under `jax.set_mesh` of a (data 2, fsdp 2, tensor 2) mesh with the
rows split over (data, fsdp) and the hidden units over tensor, as DuoFFN holds them. Prints the
largest difference relative to the largest magnitude of the one-device results.
"""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from pallas_kernels.routed_ffn import ffn_by_route

M, D, F = 64, 32, 64   # rows (16 per row shard), features, padded hidden units (32 per shard)


def main():
  from adacomp import sharding  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 8, jax.devices()
  k = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(k[0], (M, D))
  routes = jax.random.randint(k[1], (M,), -1, 2)           # skip, small, big
  w_in = jax.random.normal(k[2], (2, D, F)) * D ** -0.5
  w_out = jax.random.normal(k[3], (2, F, D)) * F ** -0.5
  widths = jnp.array([16, 64], jnp.int32)                  # small lives on tensor shard 0 only
  cotangent = jax.random.normal(k[4], (M, D))

  def value_and_grads(x, w_in, w_out, routes):
    f = lambda x, w_in, w_out: ffn_by_route(x, routes, w_in, w_out, widths, impl="interpret")
    value = jax.jit(f)(x, w_in, w_out)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * cotangent), argnums=(0, 1, 2)))(
        x, w_in, w_out)
    return [np.asarray(value)] + [np.asarray(g) for g in grads]

  one = value_and_grads(x, w_in, w_out, routes)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  with jax.set_mesh(mesh):
    put = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))
    many = value_and_grads(put(x, ("data", "fsdp")), put(w_in, None, "fsdp", "tensor"),
                           put(w_out, None, "tensor", "fsdp"), put(routes, ("data", "fsdp")))
  err = max(float(np.abs(a - b).max() / np.abs(a).max()) for a, b in zip(one, many))
  print(json.dumps({"relative_error": err}))


if __name__ == "__main__":
  sys.exit(main())
