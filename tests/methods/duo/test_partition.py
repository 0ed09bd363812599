"""Duo stage 1 with routed compute under a device mesh (a subprocess with 8 simulated devices:
partition_check.py): the interpreted kernels give one device's losses on a (data 2, fsdp 2,
tensor 2) mesh, and the train step exported for TPU under a 2 x 2 mesh runs routed_ffn's Mosaic
kernels (forward and backward)."""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))


def test_stage1_sorted_on_eight_devices_matches_one_device_and_exports_the_kernels():
  out = subprocess.run([sys.executable, os.path.join(HERE, "partition_check.py")], cwd=REPO,
                       capture_output=True, text=True, timeout=900, check=False,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert len(result["one_device"]) == 2
  for a, b in zip(result["one_device"], result["eight_devices"]):
    assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), result
  assert result["one_device"][-1] < result["one_device"][0]
  assert result["tpu_custom_call"] and result["routed_gmm"] and result["routed_tgmm"], result
