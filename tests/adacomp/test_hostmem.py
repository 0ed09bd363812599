"""adacomp.hostmem: with it, a jitted call whose temporaries exceed glibc's 64 MiB thread-arena
heaps reuses the previous call's pages instead of faulting in fresh ones."""
import json
import os
import platform
import subprocess
import sys

import pytest

from adacomp import hostmem

# Temporaries of about 113 MB (two cumulative sums of a 36 MB array: memory_analysis reads
# them), minor page faults per call counted with getrusage.
PROBE = r"""
import json, resource, sys
from adacomp import hostmem
kept = hostmem.keep_freed_memory()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.cumsum(jnp.sin(x), axis=0)[-1].sum()
            + jnp.cumsum(jnp.cos(x), axis=1)[:, -1].sum())
x = jnp.ones((3072, 3072))
temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
faults = []
for _ in range(8):
  r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(f(x))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(json.dumps({"kept": kept, "temp": temp, "faults": faults}))
"""


def _probe(mode):
  env = dict(os.environ, ADACOMP_HOST_MALLOC=mode, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                       check=True, timeout=300)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc's malloc only")
def test_freed_temporaries_are_reused():
  default, kept = _probe("default"), _probe("keep")
  assert not default["kept"] and kept["kept"]
  pages = default["temp"] / 4096
  assert pages > 64 * 2 ** 20 / 4096  # over a thread arena's heap: mmap-ed each call
  later = lambda r: sorted(r["faults"][2:])[len(r["faults"][2:]) // 2]  # median after warm-up
  # glibc maps the temporaries afresh on every call: each of their pages faults again.
  assert later(default) > 0.9 * pages
  # Kept in the heap: the next call finds its pages already there.
  assert later(kept) < 0.05 * pages


def test_bad_mode_names_the_choices(monkeypatch):
  monkeypatch.setattr(hostmem, "_applied", None)
  monkeypatch.setenv("ADACOMP_HOST_MALLOC", "always")
  with pytest.raises(ValueError, match="'auto'.*'keep'.*'default'"):
    hostmem.keep_freed_memory()


def test_default_mode_and_accelerators_leave_malloc_alone(monkeypatch):
  monkeypatch.setattr(hostmem, "_applied", None)
  monkeypatch.setenv("ADACOMP_HOST_MALLOC", "default")
  assert hostmem.keep_freed_memory() is False
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert not hostmem._runs_on_cpu()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert hostmem._runs_on_cpu()
