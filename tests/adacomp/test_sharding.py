import json
import os
import subprocess
import sys

import jax
import pytest

from adacomp import sharding

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
